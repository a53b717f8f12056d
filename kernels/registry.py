"""Registers the Triton implementations into :mod:`cps_fast.ops` as backend ``"triton"``.

``cps_fast.ops`` imports this module lazily, the first time the triton backend is asked
for; an ImportError here (triton missing) makes the backend unavailable with that reason.
Each implementation is a thin wrapper over a ``torch.library`` custom op
(``torch.ops.cps_fast.<op>_triton``) whose autograd formula only scales gradients the
forward already wrote (CE, CPS) or computes the gradient in one kernel (OHEM); the confusion
matrix has no gradient.
"""

from __future__ import annotations

from ._common import HAVE_TRITON

if not HAVE_TRITON:
    raise ImportError("triton is not installed (pip install 'cps_fast[triton]')")

from cps_fast import ops  # noqa: E402

from .confusion_matrix import confusion_matrix_triton  # noqa: E402
from .cps_loss import cps_loss_triton  # noqa: E402
from .cross_entropy import cross_entropy_triton  # noqa: E402
from .ohem_cross_entropy import ohem_cross_entropy_triton  # noqa: E402

OP_NAMES = {
    "cross_entropy": "cps_fast::cross_entropy_triton",
    "ohem_cross_entropy": "cps_fast::ohem_cross_entropy_triton "
                          "(+ cps_fast::ohem_cross_entropy_triton_backward)",
    "cps_loss": "cps_fast::cps_loss_triton",
    "confusion_matrix": "cps_fast::confusion_matrix_triton",
}

ops.register("cross_entropy", "triton")(cross_entropy_triton)
ops.register("ohem_cross_entropy", "triton")(ohem_cross_entropy_triton)
ops.register("cps_loss", "triton")(cps_loss_triton)
ops.register("confusion_matrix", "triton")(confusion_matrix_triton)
