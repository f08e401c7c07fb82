"""Start the semiseg-zoo MONAI Label server, bound to 127.0.0.1 unless ``--host`` says otherwise.

``monailabel start_server`` alone binds every interface (0.0.0.0) by default; this launcher runs the same
server (``python -m monailabel.main start_server``, in this process) with this folder as the app and a loopback
default. Examples::

    python tools/monailabel_app/serve.py --studies /data/studies
    python tools/monailabel_app/serve.py --studies /data/studies --port 8123 --conf models supervised,ssnet
    python tools/monailabel_app/serve.py --studies /data/studies --host 0.0.0.0   # network-wide, on purpose

Arguments it does not know (e.g. ``--log_level debug``) go to ``monailabel start_server`` unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

APP_DIR = os.path.dirname(os.path.abspath(__file__))


def build_command(argv: list[str] | None = None) -> list[str]:
    """The ``python -m monailabel.main start_server ...`` command line for ``argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", "-s", required=True, help="studies folder (images; labels in labels/final/)")
    parser.add_argument("--host", "-i", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", "-p", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--app", "-a", default=APP_DIR, help="app folder holding main.py (default: this folder)")
    parser.add_argument("--bundles", default=None, help="bundles folder (default: the repository's bundles/)")
    parser.add_argument("--conf", "-c", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="app option, e.g. --conf models supervised (see main.py)")
    args, rest = parser.parse_known_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is outside 1..65535")
    if not os.path.isfile(os.path.join(args.app, "main.py")):
        parser.error(f"--app {args.app}: no main.py there")
    conf = list(args.conf)
    if args.bundles:
        conf.append(["bundles_dir", os.path.realpath(args.bundles)])
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", args.app, "--studies", args.studies,
           "--host", args.host, "--port", str(args.port)]
    for key, value in conf:
        cmd += ["--conf", key, value]
    return cmd + rest


def main(argv: list[str] | None = None) -> None:
    cmd = build_command(argv)
    if importlib.util.find_spec("monailabel") is None:
        sys.exit("monailabel is not installed: run 'python tools/monailabel_app/install.py' first")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # same process id: stopping this process stops the server


if __name__ == "__main__":
    main()
