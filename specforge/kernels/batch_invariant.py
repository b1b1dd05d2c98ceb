"""The deterministic switch: while `batch_invariant(True)` is open, matmuls, softmaxes, RMSNorms and the
decoder's attention run on the batch-invariant kernels of this package.

HF models are not forked. The switch swaps what they call:
- aten::mm, addmm, bmm, _softmax and _log_softmax get CUDA implementations from a torch.library
  registration (so nn.Linear, F.softmax and their backward all land on the kernels), removed on exit;
- the forward of the RMSNorm classes of the supported families (and of ours, `register_norm_class`), and of
  Llama 4's q/k L2 norm, is replaced for the duration by one calling the invariant kernel;
- the static-cache attention of the decoder (target and draft) asks `active()` and takes the invariant
  attention kernel.
On the CPU only the last two apply (their PyTorch references); the CPU is deterministic run to run anyway.
Not covered: the target's attention inside training (SDPA, deterministic run to run) and the draft's TTT
attention (flex); training needs repeatability there, not invariance.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from .invariant_matmul import matmul
from .invariant_norm import rms_norm
from .invariant_softmax import softmax

_active = False
_training = False  # the matmul's setting: decoding (K split) or training (wide tiles; see invariant_matmul)

# module, class: RMSNorm classes whose forward is HF Llama's formula (weight * normed.to(input dtype)).
NORM_CLASSES = [("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
                ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
                ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
                ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
                ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRMSNorm"),
                ("transformers.models.llama4.modeling_llama4", "Llama4TextRMSNorm")]
# This package's own RMSNorm classes and the method holding the formula, registered by the modules that
# define them (`register_norm_class`): a kernel module never imports the model code above it.
_registered_norms: list[tuple[type, str]] = []


def register_norm_class(cls: type, method: str = "forward") -> type:
    """Have the switch swap `cls.<method>` as it does HF's RMSNorms' forward (same formula, a `weight` and
    `eps`); a forward that does more around the formula names the method that holds it."""
    if (cls, method) not in _registered_norms:
        _registered_norms.append((cls, method))
    return cls


def active() -> bool:
    return _active


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _eps(norm) -> float:
    """A norm's epsilon: HF names it `variance_epsilon` (Llama 4's weightless norm too, since transformers
    5.25; `eps` before), ours `eps`."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps


def _norm_forward(self, x):
    return rms_norm(x, _local(self.weight), _eps(self))


def _l2_norm_forward(self, x):
    """Llama 4's q/k L2 norm: HF's RMSNorm formula without a weight, in float32 whatever the input."""
    ones = torch.ones(x.shape[-1], dtype=torch.float32, device=x.device)
    return rms_norm(x.float(), ones, _eps(self)).type_as(x)


# module, class: weightless L2 norms, swapped for `_l2_norm_forward`.
L2_NORM_CLASSES = [("transformers.models.llama4.modeling_llama4", "Llama4TextL2Norm")]


def _mm(a, b):
    return matmul(a, b, training=_training)


def _bmm(a, b):
    return matmul(a, b, training=_training)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    if bias.dim() == 1 and beta == 1 and alpha == 1:
        return matmul(a, b, bias, training=_training)
    out = matmul(a, b, training=_training)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else bias * beta)


def _softmax(x, dim, half_to_float):
    return softmax(x, dim, log=False, out_dtype=torch.float32 if half_to_float else None)


def _log_softmax(x, dim, half_to_float):
    return softmax(x, dim, log=True, out_dtype=torch.float32 if half_to_float else None)


def _norm_classes(names=NORM_CLASSES):
    for module, name in names:
        try:
            yield getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # a family this transformers version lacks
            continue


@contextlib.contextmanager
def batch_invariant(enabled: bool = True, training: bool = False):
    """Route the ops above through the batch-invariant kernels while open (a no-op when not `enabled`, or
    when already open). `training`: the matmul setting for many rows."""
    global _active, _training
    if not enabled or _active:
        yield
        return
    _training = training
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point
        warnings.simplefilter("ignore")
        for op, fn in (("mm", _mm), ("addmm", _addmm), ("bmm", _bmm), ("_softmax", _softmax),
                       ("_log_softmax", _log_softmax)):
            lib.impl(op, fn, "CUDA")
    swaps = [(cls, "forward", _norm_forward) for cls in _norm_classes()] + \
        [(cls, method, _norm_forward) for cls, method in _registered_norms] + \
        [(cls, "forward", _l2_norm_forward) for cls in _norm_classes(L2_NORM_CLASSES)]
    saved = [(cls, method, cls.__dict__[method]) for cls, method, _ in swaps]
    for cls, method, forward in swaps:
        setattr(cls, method, forward)
    _active = True
    try:
        yield
    finally:
        _active, _training = False, False
        for cls, method, fwd in saved:
            setattr(cls, method, fwd)
        lib._destroy()
