"""What every capture source that runs refsd's own pipeline loop writes
(LiteRT's interpreter and GPU accelerator: ``capture.py``; refsd's fp16
emulation: ``capture_emulated.py``): the tensors beyond the trace, and the
capture.json fields they share. A bundle from any other runtime is written
with ``refsd_validate.bundle.write_bundle`` directly."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from refsd import trace


def pipeline_tensors(pipe, request, result, scheduler: str) -> dict[str, np.ndarray]:
    """The run's boundary trace plus the inputs a bundle records: the token ids
    ``[negative_prompt, prompt]`` and the timesteps the scheduler ran."""
    from refsd.schedulers import make_scheduler  # noqa: PLC0415

    tensors = dict(result.trace)
    tensors[trace.TOKEN_IDS] = np.concatenate([pipe.token_ids(request.negative_prompt), pipe.token_ids(request.prompt)])
    tensors[trace.TIMESTEPS] = np.asarray(
        make_scheduler(scheduler, pipe.scheduler_config).set_timesteps(request.steps)).astype(np.int64)
    return tensors


def capture_document(*, tool: str, device: Mapping, runtime: Mapping, model: Mapping, stages: Mapping, request,
                     scheduler: str) -> dict:
    """capture.json without what ``write_bundle`` fills in (schema, version, created, tensors)."""
    return {
        "tool": tool,
        "device": dict(device),
        "runtime": dict(runtime),
        "model": dict(model),
        "stages": dict(stages),
        "request": {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                    "steps": request.steps, "scheduler": scheduler, "guidance": float(request.guidance),
                    "height": request.height, "width": request.width},
    }
