"""Ray calls made from clean-up code of a task that may be being cancelled."""

from __future__ import annotations

import contextvars
from collections.abc import Callable


def submit_outside_current_task(submit: Callable, *args) -> None:
    """`submit(*args)` (a `.remote` call) as no task's child.

    Ray cancels a cancelled task's children with it (Serve cancels a replica call whose caller went
    away), and in an async actor a child is whatever is submitted under the task's context, its clean-up
    included: an abort sent to a rank from a cancelled model server call's `finally` was cancelled with
    it in 3 of 30 client cancels, and the request ran on to max_tokens. An empty context is no task's.
    """
    contextvars.Context().run(submit, *args)
