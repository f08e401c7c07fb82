"""Diagnostic (run from the repository root: python tools/gapmatch_bn_reestimation.py [run_name]).

Diagnostic (not a result of the method): val Dice of the GapMatch best model with its BatchNorm running statistics
as trained vs re-estimated on clean (labelled + weak unlabelled) training batches only."""
import json, os, sys

import torch
from monai.bundle import ConfigWorkflow
B = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bundles", "gapmatch"))
run = sys.argv[1] if len(sys.argv) > 1 else "acdc_cpu_v1_7p"
wf = ConfigWorkflow(config_file=[f"{B}/configs/train.json", f"{B}/configs/acdc_cpu_v1.json"], workflow_type="train",
                    logging_file=False, meta_file=f"{B}/configs/metadata.json", bundle_root=B,
                    dataset_dir=os.environ.get("ACDC_DIR", os.path.join(B, "..", "..", "..", "shared", "data", "ACDC")), output_dir="/tmp/gapmatch_diag", num_workers=0)
wf.initialize()
net = wf.parser.get_parsed_content("network")
net.load_state_dict(torch.load(f"{B}/runs/{run}/models/model.pt", map_location="cpu"))
ev = wf.parser.get_parsed_content("validate#evaluator")
ev.run(); before = dict(ev.state.metrics)
loader = wf.parser.get_parsed_content("train#dataloader")
bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
for m in bns:
    m.reset_running_stats(); m.momentum = None  # cumulative average
net.train()
with torch.no_grad():
    for i, batch in enumerate(loader):
        net(batch["labeled"]["image"]); net(batch["unlabeled"]["image"])
        if i == 49: break
ev.run(); after = dict(ev.state.metrics)
print(json.dumps({"run": run, "as_trained": before, "bn_reestimated_clean_50_batches": after}))
