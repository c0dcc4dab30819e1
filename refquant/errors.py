"""refquant's exceptions: every error a user can cause names the file, node or tensor involved."""


class RefquantError(Exception):
    """Base class of every error refquant raises for a problem in its input."""


class ModelLoadError(RefquantError):
    """The file is missing, truncated, not ONNX, or the model is malformed."""


class UnsupportedOpError(RefquantError):
    """The model uses op types outside the registry; ``ops`` lists every one of them at once."""

    def __init__(self, ops, source="model"):
        self.ops = sorted(set(ops))
        listed = ", ".join(f"{d}::{t}" if d else t for d, t in self.ops)
        super().__init__(
            f"{source}: unsupported op type(s): {listed}. "
            "refquant cannot run this model; `refquant info MODEL` lists every op it uses."
        )


class UnsupportedTypeError(RefquantError):
    """A tensor has an element type refquant does not compute with (string, bfloat16, float8, ...)."""


class FeedError(RefquantError):
    """A feed is missing, unknown, or has the wrong dtype or rank."""


class OpError(RefquantError):
    """An op failed while running; names the node and the op."""
