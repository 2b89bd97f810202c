"""Teachers: anything that answers prompts (and, where it can, gives top-k log-probabilities)."""

from distill.teachers.base import Completion, GenerationSettings, Request, Teacher

__all__ = ["Completion", "GenerationSettings", "Request", "Teacher"]
