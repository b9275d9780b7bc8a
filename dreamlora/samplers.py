"""Sampler names (flags --sampler, --prior-sampler, --validation-sampler) and the diffusers schedulers behind them.

Plain data, importable without torch: the configuration and the CLI's --help list the names from here;
`dreamlora.models.loading.make_scheduler` builds the scheduler.

The solvers start from the top of the noise schedule at every step count ("trailing" spacing). SD's own
configs say "leading", which starts 20-step DPM-Solver++ at t = 941 and 200 steps at t = 801: each step
count then solves the ODE from another starting point, and the initial noise misses part of the signal
the model expects there (benchmarks/README.md, "Where the solvers start").
"""

from __future__ import annotations

from typing import Literal, get_args

_FROM_THE_TOP = {"timestep_spacing": "trailing"}

Sampler = Literal["dpm++2m", "ddim", "pndm", "euler", "euler_a", "ddpm", "unipc"]

# name -> (diffusers scheduler class, the settings that define the sampler over the model's own config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_FROM_THE_TOP}),
    "ddim": ("DDIMScheduler", dict(_FROM_THE_TOP)),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as diffusers' pipelines and reference script run it
    "euler": ("EulerDiscreteScheduler", dict(_FROM_THE_TOP)),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(_FROM_THE_TOP)),
    "ddpm": ("DDPMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", dict(_FROM_THE_TOP)),  # UniPC, bh2 corrector: ComfyUI's uni_pc
}
assert tuple(SAMPLERS) == get_args(Sampler)  # one list of names: the Literal for --help, the table for diffusers

DEFAULT_SAMPLER: Sampler = "dpm++2m"  # DPM-Solver++ 2M: near 50-step PNDM quality in 20 steps
