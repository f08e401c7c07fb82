"""How a training step runs: memory format, ``torch.compile`` and numeric precision (issue 16).

:class:`FastPath` holds the three trainer options every bundle's ``train.json`` exposes:

* ``channels_last`` (default on): the backbone's and the method's weights, and the images of every batch, in
  ``torch.channels_last`` (2D) / ``torch.channels_last_3d`` (3D) memory format, so oneDNN convolutions run without
  layout conversions. The values are the same tensors in another layout: results equal the plain step within
  float tolerance (``tests/test_fast_path.py``).
* ``compile`` (default off): ``torch.compile`` of the conv/BatchNorm/activation blocks (every ``nn.Sequential``
  holding a BatchNorm) of the network and the method's modules, so Inductor fuses the memory-bound BatchNorm,
  LeakyReLU and dropout work around each convolution. Blocks, not the whole network, because the methods call
  several entry points (``forward``, ``forward_features``, ``forward_branches``) in several modes (frozen BN
  statistics, no-grad targets, input gradients); the blocks see them all. The U-Net up blocks call their block's
  layers one by one (``_ConvBlock.forward_concat``), so they run eagerly. If compiling fails, the step falls back
  to eager with one warning.
* ``precision``: ``"float32"`` (default), ``"bf16"`` (CPU with bf16 support, or CUDA) or ``"fp16"`` (CUDA only, with
  a gradient scaler): autocast around the method's step. Logits leave the backbone in float32 (a hook on the
  network's ``head``) and every returned loss is cast to float32, so losses, their logs and metrics stay float32.

* ``reuse_freed_memory`` (default on): on the CPU, glibc keeps freed blocks for reuse instead of returning them to the
  system (:mod:`common.engines.host_memory`), so a step does not re-fault its buffers page by page each iteration.
  Where memory comes from, not what is computed: results are bit-identical.

A mistyped value is refused with a message naming the key (``FastPathError``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from common.engines.dropout_mask import dropout_scale, keep_mask
from common.engines.host_memory import freed_memory_reused as _freed_memory_reused
from common.engines.host_memory import reuse_freed_memory as _reuse_freed_memory

__all__ = ["FastPath", "FastPathError", "PRECISIONS", "check_precision", "cpu_supports_bf16", "memory_format_for",
           "to_channels_last"]

logger = logging.getLogger(__name__)

#: accepted ``precision`` values
PRECISIONS = ("float32", "bf16", "fp16")
_ALIASES = {"fp32": "float32", "float": "float32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


class FastPathError(ValueError):
    """A fast-path option has a wrong type or value; the message names the config key."""


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 / AMX, or AVX512 emulation)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _check_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise FastPathError(f"'{key}' must be true or false, got {value!r} ({type(value).__name__})")


def check_precision(value: Any, device: torch.device | str = "cpu", key: str = "precision") -> str:
    """The canonical precision name for ``value`` on ``device``; raises :class:`FastPathError` naming ``key``."""
    if not isinstance(value, str):
        raise FastPathError(f"'{key}' must be one of {list(PRECISIONS)}, got {value!r} ({type(value).__name__})")
    name = _ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in PRECISIONS:
        raise FastPathError(f"'{key}' must be one of {list(PRECISIONS)}, got {value!r}")
    device_type = torch.device(device).type
    if name == "fp16" and device_type != "cuda":
        raise FastPathError(f"'{key}': fp16 mixed precision needs a CUDA device (got {device_type}); "
                            "use 'bf16' on a CPU")
    if name == "bf16" and device_type == "cpu" and not cpu_supports_bf16():
        raise FastPathError(f"'{key}': this CPU has no bf16 support in oneDNN; use 'float32'")
    return name


def memory_format_for(tensor: torch.Tensor) -> Optional[torch.memory_format]:
    """``channels_last`` for 4D tensors, ``channels_last_3d`` for 5D, ``None`` otherwise."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (4D or 5D) with channels-last strides, also when it has one channel.

    ``contiguous(memory_format=...)`` leaves a one-channel tensor (a grey-level image batch ``(B, 1, H, W)``, the
    first conv's weight ``(F, 1, k, k)``) with its standard strides, since it already counts as channels-last;
    ATen then takes the first convolution for a standard-layout one, its output comes out in the standard layout,
    and the whole first block (BatchNorm, activation, dropout) runs there before the next convolution copies it
    back. Strides written out as channels-last (``(H W, 1, W, 1)``) keep every layer channels-last. Same values;
    other tensors are returned by ``contiguous(memory_format=...)``.
    """
    fmt = memory_format_for(tensor)
    if fmt is None:
        return tensor
    if tensor.shape[1] != 1:
        return tensor.contiguous(memory_format=fmt)
    spatial = tensor.shape[2:]
    strides = [1] * tensor.dim()  # dims ordered N, spatial..., C=1 in memory: C has stride 1
    step = 1
    for d in reversed(range(2, tensor.dim())):
        strides[d] = step
        step *= spatial[d - 2]
    strides[0] = step
    if tuple(tensor.stride()) == tuple(strides):
        return tensor
    out = torch.empty_strided(tuple(tensor.shape), tuple(strides), dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)


def _compile_units(modules: Iterable[nn.Module]) -> List[nn.Module]:
    """The ``nn.Sequential`` blocks that hold a BatchNorm directly (conv -> BN -> activation ...), outermost only."""
    units: List[nn.Module] = []
    seen = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            if isinstance(m, nn.Sequential) and any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.children()):
                units.append(m)
                seen.update(id(s) for s in m.modules())
    return units


class _LayoutFreeDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is the plain step's whatever the input's memory format, drawn faster.

    ATen's CPU dropout draws ``bernoulli_`` into a tensor laid out like the input, so a channels-last input would get
    a different mask from the same random state than the plain step does. Here the mask is always drawn in the
    standard element order, so the random stream, the mask and therefore a seeded run stay identical to the plain
    step, bit for bit: the same ``x * (mask / keep)`` product with ``nn.Dropout``'s float mask values, hence the same
    outputs and gradients (signed zeros, NaN and Inf included). For float32 inputs the draws come from
    :func:`~common.engines.dropout_mask.keep_mask` (the same numbers as ``bernoulli_``, from int64 ``random_()``,
    written straight into the input's layout): on the 2-core AMD EPYC here a CML no-grad dual pass at batch 4 went
    from 103.5-105.3 to 98.6-100.5 ms (``docs/speed_fast_path.md``, round 5). Other dtypes (bf16 under autocast) keep
    ``bernoulli_`` in their dtype. ``inplace=True`` multiplies the input in place, as ``nn.Dropout`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if x.dtype != torch.float32 and x.is_contiguous():
            return super().forward(x)
        keep = 1.0 - self.p
        if self.p == 1.0:
            mask = torch.zeros_like(x)
        elif x.dtype != torch.float32:
            mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
        else:
            fmt = memory_format_for(x)
            layout = fmt if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt) \
                else torch.contiguous_format
            mask = keep_mask(x.shape, keep, layout, dtype=x.dtype).mul_(dropout_scale(keep))
        return x.mul_(mask) if self.inplace else x * mask


class FastPath:
    """The trainer's memory format, compile and precision settings (see the module docstring).

    Args:
        channels_last: channels-last weights and batch images.
        compile: ``torch.compile`` the conv blocks (falls back to eager with one warning).
        precision: ``"float32"``, ``"bf16"`` or ``"fp16"`` (see :data:`PRECISIONS`).
        device: where the step runs (checks that the precision is available there).
        reuse_freed_memory: on a CPU device, keep freed host memory in the process for reuse
            (:func:`common.engines.host_memory.reuse_freed_memory`; process-wide, applied here).
    """

    def __init__(self, channels_last: bool = True, compile: bool = False, precision: str = "float32",
                 device: torch.device | str = "cpu", reuse_freed_memory: bool = True) -> None:
        self.channels_last = _check_bool("channels_last", channels_last)
        self.compile = _check_bool("compile", compile)
        self.device = torch.device(device)
        self.precision = check_precision(precision, self.device)
        self.reuse_freed_memory = _check_bool("reuse_freed_memory", reuse_freed_memory)
        if self.reuse_freed_memory and self.device.type == "cpu":
            _reuse_freed_memory()
        self._compiled: List[nn.Module] = []
        self._hooks: List[Any] = []
        self._warned = False

    def __repr__(self) -> str:
        return (f"FastPath(channels_last={self.channels_last}, compile={self.compile}, "
                f"precision='{self.precision}', device='{self.device}', reuse_freed_memory={self.reuse_freed_memory})")

    def describe(self) -> Dict[str, Any]:
        """What the step runs with (for run summaries and benchmark rows)."""
        return {"precision": self.precision, "memory_format": "channels_last" if self.channels_last else "contiguous",
                "compile": bool(self._compiled) if self.compile else False,
                # the process's state: an earlier request may have applied it, and it cannot be undone
                "reuse_freed_memory": _freed_memory_reused()}

    # -- precision ----------------------------------------------------------------------------------------------
    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the step (a no-op context in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def float32_losses(losses: Dict[str, Any]) -> Dict[str, Any]:
        """Every floating tensor entry of a step's result in float32 (losses and logs stay float32)."""
        return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32 else v)
                for k, v in losses.items()}

    # -- modules ------------------------------------------------------------------------------------------------
    def prepare(self, *modules: Optional[nn.Module]) -> None:
        """Apply the memory format, the float32-logits hooks and compile to ``modules`` (in place)."""
        modules = tuple(m for m in modules if m is not None)
        if self.channels_last:
            for module in modules:
                self._to_channels_last(module)
        if self.autocast_dtype is not None:
            for module in modules:
                self._float_logits(module)
        if self.compile:
            self._compile(modules)

    @staticmethod
    def _to_channels_last(module: nn.Module) -> None:
        for m in module.modules():
            if type(m) is nn.Dropout:
                m.__class__ = _LayoutFreeDropout  # same masks as the plain step (see the class)
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if memory_format_for(t) is not None:
                    laid_out = to_channels_last(t.data)
                    if laid_out is not t.data:
                        t.data = laid_out

    def _float_logits(self, module: nn.Module) -> None:
        """Logits leave every ``head`` of ``module`` in float32, so the losses are computed in float32."""
        def to_float(_m: nn.Module, _inputs: Any, output: Any) -> Any:
            return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

        for name, sub in module.named_modules():
            if name.split(".")[-1] == "head" and not getattr(sub, "_fast_path_float_hook", False):
                self._hooks.append(sub.register_forward_hook(to_float))
                sub._fast_path_float_hook = True

    def _compile(self, modules: Iterable[nn.Module]) -> None:
        import torch._dynamo

        # the methods run each block at a few batch sizes, modes (train/eval, frozen BN statistics) and with or
        # without gradients: allow the variants instead of silently falling back to eager after eight
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, max(64, getattr(torch._dynamo.config, attr)))
        torch._dynamo.config.suppress_errors = True  # a failing graph runs eagerly instead of stopping training
        for unit in _compile_units(modules):
            if getattr(unit, "_fast_path_compiled", False):
                continue
            try:
                unit.compile(dynamic=None)
            except Exception as err:  # pragma: no cover - depends on the torch build
                self._fall_back(err)
                return
            unit._fast_path_compiled = True
            self._compiled.append(unit)
        self._install_fallback()

    def _install_fallback(self) -> None:
        """Wrap each compiled block so that an error from compiling it switches every block back to eager once."""
        for unit in self._compiled:
            if getattr(unit, "_fast_path_guard", False):
                continue
            compiled_call = unit._compiled_call_impl

            def guarded(*args: Any, _call=compiled_call, _unit=unit, **kwargs: Any) -> Any:
                if not self._compiled:
                    return _unit._call_impl(*args, **kwargs)
                try:
                    return _call(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - any compiler failure
                    if isinstance(err, (KeyboardInterrupt, torch.cuda.OutOfMemoryError)):
                        raise
                    self._fall_back(err)
                    return _unit._call_impl(*args, **kwargs)

            unit._compiled_call_impl = guarded
            unit._fast_path_guard = True

    def _fall_back(self, err: BaseException) -> None:
        for unit in self._compiled:
            unit._compiled_call_impl = None
        self._compiled = []
        if not self._warned:
            logger.warning("torch.compile failed (%s: %s); training continues eagerly", type(err).__name__,
                           str(err).splitlines()[0][:200] if str(err) else "")
            self._warned = True

    # -- batches ------------------------------------------------------------------------------------------------
    def batch(self, batch: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The batch with its floating image tensors in the channels-last format (labels are left alone)."""
        if batch is None or not self.channels_last:
            return batch
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v) and v.is_floating_point() and k != "label":
                v = to_channels_last(v)
            out[k] = v
        return out
