"""Session models: inputs -> body -> weight-tied next-item head (plain PyTorch, no Ray)."""

from raytr.models.session_model import SessionModel, SessionOutput

__all__ = ["SessionModel", "SessionOutput"]
