"""Outer loop: initialise, then alternate clustering and correction until the objective settles."""

from __future__ import annotations


def run_harmony(embedding, design, params, backend):  # replaced by the engine
    raise NotImplementedError("engine in progress")
