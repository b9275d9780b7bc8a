"""dreamlora against diffusers' own train_dreambooth_lora.py: per-step time and fixed overhead, measured apart.

Both run as a user runs them, each in its own process, on the same random-weight model folder
(benchmarks/models.py, "tiny" by default), the same 5 instance images (sample_instances/polkaball, copied
into a scratch folder: the script reads every file of its folder), the same 20 class images given as a
folder to both (neither generates any), and the same settings: prior preservation (weight 1), batch 1 + 1,
LoRA rank 4 on to_q/k/v/out, fp32, center crop, resolution 64, AdamW lr 1e-4 with a constant schedule,
gradient clipping 1.0, no validation during training, no checkpoint during training, seed 0.

- "reference": diffusers' examples/dreambooth/train_dreambooth_lora.py at the commit PIN below, run with
  `python train_dreambooth_lora.py ...` (or `--launcher accelerate`: `accelerate launch --num_processes 1
  --cpu ...`), with its defaults otherwise (its DataLoader re-reads and VAE-encodes the two images and runs
  the text encoder every step; it logs to tensorboard every step).
- "dreamlora": `python -m cli train ... --class-dir ...` with the matching flags; its final validation grid
  is on by default and cannot be turned off (`--validate-every 0` means "at the end only").
- "dreamlora-small-grid": the same with a TOML file shrinking the final grid to its least
  (one prompt, one seed, one sampler step: two images, base and LoRA).

Each side runs at two step counts (default 20 and 80), repeated (default 3) and interleaved; per repetition
the per-step time is the slope (T(80) - T(20)) / 60 and the fixed overhead the intercept T(20) - 20 * slope.
Wall seconds, the child process's CPU seconds (user + sys, from wait4) and the 1-minute load average
before and after each run are recorded: CPU seconds are the steadier figure on a shared machine.

The script is never committed. It is looked for in benchmarks/.reference/<PIN>/ (git-ignored), else taken
from a diffusers clone (--diffusers-git), else downloaded from GitHub; --script PATH uses a given file.
It needs torchvision and tensorboard, which dreamlora does not: `--make-reference-env DIR` builds a
virtualenv on top of this environment with them (torchvision paired with the installed torch), then pass
`--reference-python DIR/bin/python`.

    python benchmarks/reference_script.py --make-reference-env /tmp/refenv
    python benchmarks/reference_script.py --reference-python /tmp/refenv/bin/python            # the table
    python benchmarks/reference_script.py --reference-python /tmp/refenv/bin/python --imports  # import cost
    python benchmarks/reference_script.py --phases                       # dreamlora's fixed part, phase by phase
"""

from __future__ import annotations

import time

_WORKER_T0 = time.perf_counter()  # first thing: --phases-worker measures its imports from here

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

# diffusers v0.40.0 (release commit, 2026-08-20): the newest release in reach when this was written (the
# installed diffusers is 0.42.1). The script is byte-identical at main 58eb52c0 (2026-08-23) and at the
# post-release commit 25b97c76 except for its check_min_version() line.
PIN = "d035dcd7cc7c88e0a154609b62887d50bba9fdc2"
PIN_SHA256 = "97cf38b184cad2cc39e414f79b3f1a70cec3b97883350a4d2a3aa0e2533d7883"
SCRIPT_IN_REPO = "examples/dreambooth/train_dreambooth_lora.py"
SCRIPT_URL = f"https://raw.githubusercontent.com/huggingface/diffusers/{PIN}/{SCRIPT_IN_REPO}"
SCRATCH = BENCH / ".reference"  # git-ignored
PINNED_COPY = SCRATCH / PIN / "train_dreambooth_lora.py"

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of ball"
SMALL_GRID_TOML = """[validation]
prompts = ["a photo of {token} {class}"]
seeds = [0]
steps = 1
"""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# The reference script and its environment


def locate_script(script: str | None, diffusers_git: str | None) -> Path:
    """The pinned train_dreambooth_lora.py: --script, the scratch copy, a diffusers clone, or a download."""
    if script:
        path = Path(script)
        if not path.is_file():
            fail(f"--script {script}: no such file")
        if _sha256(path.read_bytes()) != PIN_SHA256:
            print(f"note: {path} is not the pinned script (diffusers {PIN[:10]}); measuring it anyway", file=sys.stderr)
        return path
    if PINNED_COPY.is_file() and _sha256(PINNED_COPY.read_bytes()) == PIN_SHA256:
        return PINNED_COPY
    data, tried = None, []
    if diffusers_git:
        for cmd in (["git", "--git-dir", diffusers_git, "show", f"{PIN}:{SCRIPT_IN_REPO}"],
                    ["git", "-C", diffusers_git, "show", f"{PIN}:{SCRIPT_IN_REPO}"]):
            done = subprocess.run(cmd, capture_output=True)
            if done.returncode == 0:
                data = done.stdout
                break
        tried.append(f"--diffusers-git {diffusers_git} (no commit {PIN[:10]} there)")
    if data is None:
        try:
            with urllib.request.urlopen(SCRIPT_URL, timeout=20) as response:
                data = response.read()
        except OSError as exc:
            tried.append(f"download ({exc.__class__.__name__})")
    if data is None or _sha256(data) != PIN_SHA256:
        if data is not None:
            tried.append("a file whose sha256 is not the pinned one")
        fail(f"diffusers' {SCRIPT_IN_REPO} at {PIN} is not in {PINNED_COPY.parent} and could not be fetched "
             f"({'; '.join(tried)}): pass --diffusers-git <a diffusers clone>, --script PATH, or save {SCRIPT_URL} "
             f"as {PINNED_COPY}")
    PINNED_COPY.parent.mkdir(parents=True, exist_ok=True)
    PINNED_COPY.write_bytes(data)
    return PINNED_COPY


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_reference_python(python: str, report_to: str) -> None:
    needs = ["torchvision"] + (["tensorboard"] if report_to == "tensorboard" else [])
    done = subprocess.run([python, "-c", "import " + ", ".join(needs)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        fail(f"{python} cannot import {' and '.join(needs)}, which the reference script needs ({last}): run "
             f"`python benchmarks/reference_script.py --make-reference-env /tmp/refenv` and pass "
             f"--reference-python /tmp/refenv/bin/python")


def make_reference_env(folder: str) -> None:
    """A virtualenv on top of this environment (same torch, diffusers, transformers, peft, accelerate) with
    what the reference script needs besides: torchvision paired with the installed torch, and tensorboard.

    On a CPU-only torch, PyPI's torchvision (a CUDA build) cannot load its C++ ops, and its
    _meta_registrations then fails at import ('operator torchvision::nms does not exist'). The script
    uses only torchvision.transforms, so the fake-kernel registrations are made conditional on the ops
    having loaded (a change to the venv's copy of torchvision only).
    """
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    vision = f"0.{minor + 15}.0" if major == 2 else None  # torch 2.N pairs with torchvision 0.(N+15)
    if vision is None:
        fail(f"no known torchvision for torch {torch.__version__}")
    python = Path(folder) / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", folder], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--no-deps", f"torchvision=={vision}"], check=True)  # --no-deps: keep this torch
    subprocess.run(pip + ["tensorboard", "ftfy"], check=True)  # the rest of examples/dreambooth/requirements.txt
    probe = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0 and "does not exist" in probe.stderr:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        meta = Path(site) / "torchvision" / "_meta_registrations.py"
        text = meta.read_text()
        text = text.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
        text = text.replace("import torchvision.extension  # noqa: F401\n",
                            "import torchvision.extension  # noqa: F401\n\n\n"
                            "def _register_fake_if_ops(name):  # dreamlora benchmark: ops absent on a CPU torch\n"
                            "    return torch.library.register_fake(name) if torchvision.extension._has_ops() "
                            "else (lambda fn: fn)\n", 1)
        meta.write_text(text)
        print(f"patched {meta}: fake-kernel registrations only where torchvision's C++ ops loaded")
    subprocess.run([str(python), "-c", "import torchvision, tensorboard; from torchvision import transforms; "
                    "print('torchvision', torchvision.__version__, 'tensorboard', tensorboard.__version__)"],
                   check=True)
    print(f"done: pass --reference-python {python}")


# ----------------------------------------------------------------------------------------------
# Runs


def scratch_inputs(work: Path, model: str) -> dict:
    """The model folder, a folder holding only the 5 instance PNGs, and the 20 class images."""
    sys.path.insert(0, str(BENCH))
    from models import INSTANCES, MODELS, class_folder, model_folder

    instances = work / "instances"
    instances.mkdir(parents=True, exist_ok=True)
    for png in sorted(INSTANCES.glob("*.png")):
        shutil.copy2(png, instances / png.name)
    resolution = MODELS[model]["resolution"]
    small_grid = work / "small-grid.toml"
    small_grid.write_text(SMALL_GRID_TOML)
    return {"model": str(model_folder(model)), "instances": str(instances), "classes": str(class_folder(resolution)),
            "resolution": resolution, "small_grid": str(small_grid)}


def reference_command(args, script: Path, inputs: dict, steps: int, out: Path) -> list[str]:
    py = args.reference_python
    launch = [py, str(script)] if args.launcher == "python" else \
        [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    return launch + [
        "--pretrained_model_name_or_path", inputs["model"], "--instance_data_dir", inputs["instances"],
        "--class_data_dir", inputs["classes"], "--with_prior_preservation", "--prior_loss_weight", "1.0",
        "--num_class_images", "20", "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--output_dir", str(out), "--seed", "0", "--resolution", str(inputs["resolution"]), "--center_crop",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "4", "--mixed_precision", "no",
        "--max_grad_norm", "1.0", "--checkpointing_steps", "1000000", "--report_to", args.report_to]


def dreamlora_command(inputs: dict, steps: int, out: Path, small_grid: bool) -> list[str]:
    return [sys.executable, "-m", "cli", "train", inputs["instances"], "--token", "sks", "--class-word", "ball",
            "--out", str(out / "lora.safetensors"), "--model", inputs["model"], "--steps", str(steps),
            "--class-dir", inputs["classes"], "--prior-loss-weight", "1", "--resolution", str(inputs["resolution"]),
            "--crop", "center", "--no-random-flip", "--rank", "4", "--alpha", "4", "--no-train-text-encoder",
            "--lr", "1e-4", "--lr-scheduler", "constant", "--batch-size", "1", "--grad-accum", "1",
            "--max-grad-norm", "1", "--mixed-precision", "no", "--seed", "0", "--checkpoint-every", "0",
            "--validate-every", "0"] + (["--config", inputs["small_grid"]] if small_grid else [])


def child_env(threads: int | None, dreamlora_root: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{dreamlora_root}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat, all CPUs; 0 where unreadable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(limit: float, busy_cores: float = 0.25) -> float:
    """Wait (at most `limit` seconds) until the machine's other work uses under `busy_cores` cores over 2 s."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = machine_busy_s()
        time.sleep(2)
        if (machine_busy_s() - before) / 2 < busy_cores:
            break
    return time.perf_counter() - start


def timed(cmd: list[str], *, cwd: Path, env: dict, log: Path, timeout: float) -> dict:
    """Run `cmd`; wall seconds, the child's (and its waited-for children's) CPU seconds, peak RSS, load, and
    the CPU seconds the rest of the machine used meanwhile (other processes competing for the cores)."""
    load_before = os.getloadavg()[0]
    busy_before = machine_busy_s()
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        killer = threading.Timer(timeout, proc.kill)  # the wait below blocks: no polling on the measured cores
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    result = {"wall_s": wall, "cpu_s": cpu, "user_s": usage.ru_utime,
              "sys_s": usage.ru_stime, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "load_before": load_before,
              "load_after": os.getloadavg()[0], "others_cpu_s": max(0.0, machine_busy_s() - busy_before - cpu),
              "rc": proc.returncode}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
    return result


def run_matrix(args) -> list[dict]:
    script = locate_script(args.script, args.diffusers_git) if "reference" in args.sides else None
    if script:
        check_reference_python(args.reference_python, args.report_to)
    work = Path(tempfile.mkdtemp(prefix="dreamlora-vs-reference-"))
    inputs = scratch_inputs(work, args.model)
    root = Path(args.dreamlora_root).resolve()
    env = child_env(args.threads, root)
    print(f"reference: {script or '-'} (diffusers {PIN[:10]}), python {args.reference_python}, launcher "
          f"{args.launcher}; dreamlora: {root}; model {args.model} ({inputs['model']}); scratch {work}", flush=True)
    results = []
    for rep in range(args.repeats):
        for steps in args.steps:
            # Alternate the order from one repetition to the next, so a drift of the machine hits both.
            sides = args.sides if rep % 2 == 0 else list(reversed(args.sides))
            for side in sides:
                out = work / f"{side}-{steps}-{rep}"
                if side == "reference":
                    cmd = reference_command(args, script, inputs, steps, out)
                else:
                    cmd = dreamlora_command(inputs, steps, out, small_grid=side == "dreamlora-small-grid")
                    out.mkdir(parents=True)
                waited = wait_until_idle(args.wait_idle) if args.wait_idle else 0.0
                r = {"side": side, "steps": steps, "rep": rep, "waited_s": waited,
                     **timed(cmd, cwd=root, env=env, log=work / f"{side}-{steps}-{rep}.log", timeout=args.timeout)}
                results.append(r)
                print(f"  rep {rep} {side:>21} {steps:>4} steps: wall {r['wall_s']:7.2f} s  CPU {r['cpu_s']:7.2f} s  "
                      f"RSS {r['rss_gb']:.2f} GB  load {r['load_before']:.2f}->{r['load_after']:.2f}  others' CPU "
                      f"{r['others_cpu_s']:.1f} s (waited {waited:.0f} s)"
                      + (f"  ERROR {r['error']}" if r.get("error") else ""), flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({**r, "pin": PIN, "launcher": args.launcher, "model": args.model}) + "\n")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return results


def summarize(results: list[dict], steps: list[int], sides: list[str]) -> None:
    lo, hi = min(steps), max(steps)
    fits = {}
    for side in sides:
        per_rep = []
        for rep in sorted({r["rep"] for r in results}):
            runs = {r["steps"]: r for r in results if r["side"] == side and r["rep"] == rep and not r.get("error")}
            if lo not in runs or hi not in runs:
                continue
            fit = {}
            for key in ("wall_s", "cpu_s"):
                slope = (runs[hi][key] - runs[lo][key]) / (hi - lo)
                fit[key] = (slope, runs[lo][key] - lo * slope)
            fit["load"] = max(runs[lo]["load_before"], runs[lo]["load_after"], runs[hi]["load_before"],
                              runs[hi]["load_after"])
            fit["rss_gb"] = max(runs[lo]["rss_gb"], runs[hi]["rss_gb"])
            fit["others"] = max(runs[n].get("others_cpu_s", float("nan")) / runs[n]["wall_s"] for n in (lo, hi))
            per_rep.append(fit)
        fits[side] = per_rep
    print(f"\nper step = slope of T({hi}) - T({lo}); fixed = intercept; median [min-max] over repetitions\n")
    print("| side | reps | s/step | fixed s | CPU s/step | fixed CPU s | peak RSS GB | max load | others' cores | "
          "s/step x ref | fixed x ref | CPU s/step x ref | fixed CPU x ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = fits.get("reference") or []
    for side, per_rep in fits.items():
        if not per_rep:
            print(f"| {side} | 0 | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        cells = [side, str(len(per_rep))]
        for key, part in (("wall_s", 0), ("wall_s", 1), ("cpu_s", 0), ("cpu_s", 1)):
            values = [f[key][part] for f in per_rep]
            cells.append(f"{statistics.median(values):.4g} [{min(values):.4g}-{max(values):.4g}]")
        cells.append(f"{max(f['rss_gb'] for f in per_rep):.2f}")
        cells.append(f"{max(f['load'] for f in per_rep):.2f}")
        cells.append(f"{max(f['others'] for f in per_rep):.2f}")  # other processes' CPU s per wall s, worst run
        for key, part in (("wall_s", 0), ("wall_s", 1), ("cpu_s", 0), ("cpu_s", 1)):
            if side == "reference" or not ref:
                cells.append("-")
                continue
            # Ratio of medians, and the range of the ratios of the repetitions run side by side.
            med = statistics.median(f[key][part] for f in per_rep) / statistics.median(f[key][part] for f in ref)
            pairs = [a[key][part] / b[key][part] for a, b in zip(per_rep, ref) if b[key][part] > 0]
            cells.append(f"{med:.2f} [{min(pairs):.2f}-{max(pairs):.2f}]" if pairs else f"{med:.2f}")
        print("| " + " | ".join(cells) + " |")
    print("\nLeast squares over every run of a side (steadier than the per-repetition medians when the machine is "
          "shared):\n")
    print("| side | runs | s/step | fixed s | CPU s/step | fixed CPU s |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        cells = []
        for key in ("wall_s", "cpu_s"):
            points = [(r["steps"], r[key]) for r in results if r["side"] == side and not r.get("error")]
            if len({n for n, _ in points}) < 2:
                cells += ["-", "-"]
                continue
            mean_n = sum(n for n, _ in points) / len(points)
            mean_t = sum(t for _, t in points) / len(points)
            slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
            cells += [f"{slope:.4g}", f"{mean_t - slope * mean_n:.4g}"]
        count = len([r for r in results if r["side"] == side and not r.get("error")])
        print(f"| {side} | {count} | " + " | ".join(cells) + " |")
    print("\nRuns (wall s / CPU s):")
    for side in sides:
        for n in steps:
            runs = [r for r in results if r["side"] == side and r["steps"] == n]
            print(f"  {side:>21} {n:>4} steps: " + ", ".join(
                "error" if r.get("error") else f"{r['wall_s']:.2f}/{r['cpu_s']:.2f}" for r in runs))
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# Import cost (python -X importtime)


def import_cost(args) -> None:
    """Seconds to `--help` (imports, nothing else) for both commands, and import time by top-level package."""
    root = Path(args.dreamlora_root).resolve()
    env = child_env(args.threads, root)
    commands = {"dreamlora": [sys.executable, "-m", "cli", "train", "--help"]}
    if "reference" in args.sides:
        script = locate_script(args.script, args.diffusers_git)
        check_reference_python(args.reference_python, args.report_to)
        commands["reference"] = [args.reference_python, str(script), "--help"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in commands.items():
            runs = [timed(cmd, cwd=root, env=env, log=Path(tmp) / "help.log", timeout=600) for _ in range(3)]
            walls, cpus = [r["wall_s"] for r in runs], [r["cpu_s"] for r in runs]
            print(f"\n{name}: `{' '.join(Path(c).name if c.startswith('/') else c for c in cmd)}` "
                  f"wall {statistics.median(walls):.2f} s [{min(walls):.2f}-{max(walls):.2f}], CPU "
                  f"{statistics.median(cpus):.2f} s, load {max(r['load_before'] for r in runs):.2f}")
            done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=root, env=env, capture_output=True,
                                  text=True)
            by_package: dict[str, float] = {}
            for line in done.stderr.splitlines():
                m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
                if m:
                    top = m.group(4).split(".")[0]
                    by_package[top] = by_package.get(top, 0) + int(m.group(1)) / 1e6
            total = sum(by_package.values())
            print(f"  -X importtime: {total:.2f} s of module execution in all; self time by top-level package:")
            for package, seconds in sorted(by_package.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"    {package:<24} {seconds:6.2f} s")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# dreamlora's fixed part, phase by phase (timestamps inside one `python -m cli train` process)

# Module-level helpers that dreamlora.train.train() calls once, by the name it calls them by.
TRAIN_PHASES = [
    ("fit_memory_budget", "memory budget"), ("output_paths", "output paths"),
    ("preflight_training_data", "preflight: decode every instance and class image"),
    ("process_device", "hardware check: accelerate PartialState"), ("check_hardware", "hardware check"),
    ("prepare_run_dir", "run folder"), ("run_started", "run folder"),
    ("load_base_model", "model load (from_pretrained + fingerprint)"),
    ("token_warnings", "preflight: size checks, token warnings"), ("instance_set", "data sets"),
    ("place_frozen", "freeze and place the model"), ("use_channels_last", "freeze and place the model"),
    ("class_images", "data sets"), ("add_adapters", "LoRA adapters (peft)"),
    ("BatchSource", "cache latents and prompt embeddings"), ("offload_encoders", "cache latents and prompt embeddings"),
    ("make_optimizer", "optimizer and LR schedule"), ("run_record", "run folder"),
    ("save_step", "final checkpoint (adapters + optimizer state)"),
    ("validate", "final validation grid"), ("save_output", "save the LoRA file"),
]


def phases_worker(spec: dict) -> None:
    """One `dreamlora train` through the CLI's own entry (cli.main.app), with timestamps around each phase."""
    t_launch = spec["launch_time"]
    stamps: list[tuple[str, float, float]] = []
    interp = time.time() - (time.perf_counter() - _WORKER_T0) - t_launch  # launch to the first line of this file
    t0 = time.perf_counter()
    import cli.main  # what `python -m cli` runs first (typer, the command modules; more or less of the libraries)

    stamps.append(("imports: cli.main", t0, time.perf_counter()))
    t0 = time.perf_counter()
    import importlib

    import dreamlora

    # What the train command imports next (torch, diffusers, transformers, peft, accelerate), whatever cli.main left.
    # The training module is dreamlora.training (dreamlora.train before the package became lazy).
    for name in ("dreamlora.training", "dreamlora.train"):
        try:
            train_module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(train_module, "train"):
            break
    stamps.append(("imports: dreamlora's training module, what cli.main left", t0, time.perf_counter()))

    def wrap(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed_call(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                stamps.append((label, start, time.perf_counter()))

        setattr(owner, attr, timed_call)

    import accelerate

    for attr, label in TRAIN_PHASES:
        if hasattr(train_module, attr):  # a helper renamed in a later dreamlora is left out of the table
            wrap(train_module, attr, label)
    wrap(accelerate.Accelerator, "prepare", "accelerator.prepare")  # the class's method, before the name is wrapped
    wrap(accelerate, "Accelerator", "Accelerator()")
    from dreamlora.preflight import TrainingImages

    wrap(TrainingImages, "finish", "preflight: size checks, token warnings")
    config_module = importlib.import_module("dreamlora.config")
    wrap(config_module, "load_config", "config (flags, checks)")
    dreamlora.load_config = config_module.load_config  # older CLIs take it from the package
    wrap(train_module, "train", "train() in all")
    dreamlora.train = train_module.train  # the CLI takes it from the package or from the module: the same wrapper
    from cli.progress import TerminalProgress

    steps: dict[int, float] = {}
    original_call = TerminalProgress.__call__

    def progress(self, event):
        if event.stage == "train" and event.step:
            steps[event.step] = time.perf_counter()
        return original_call(self, event)

    TerminalProgress.__call__ = progress
    argv = spec["argv"]
    profiler = None
    if spec.get("cprofile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t_cmd = time.perf_counter()
    try:
        cli.main.app(argv, standalone_mode=False)
    finally:
        if profiler:
            profiler.disable()
    t_end = time.perf_counter()
    if profiler:
        profiler.dump_stats(spec["cprofile"])
    print("PHASES " + json.dumps({"interpreter_s": interp, "stamps": stamps, "steps": steps, "t_cmd": t_cmd,
                                   "t_end": t_end, "t0": _WORKER_T0, "end_time": time.time()}), flush=True)


def reference_profile(args) -> None:
    """The reference's fixed part under cProfile: its own functions and the library calls of its set-up and end."""
    import pstats

    script = locate_script(args.script, args.diffusers_git)
    check_reference_python(args.reference_python, args.report_to)
    root = Path(args.dreamlora_root).resolve()
    work = Path(tempfile.mkdtemp(prefix="reference-profile-"))
    inputs = scratch_inputs(work, args.model)
    for rep in range(args.repeats):
        prof = work / f"ref-{rep}.prof"
        cmd = reference_command(args, script, inputs, args.phase_steps, work / f"out-{rep}")
        cmd = [cmd[0], "-m", "cProfile", "-o", str(prof), *cmd[1:]]
        r = timed(cmd, cwd=root, env=child_env(args.threads, root), log=work / "ref.log", timeout=args.timeout)
        print(f"\nreference under cProfile, {args.phase_steps} steps, run {rep}: wall {r['wall_s']:.2f} s, CPU "
              f"{r['cpu_s']:.2f} s, load {r['load_before']:.2f}->{r['load_after']:.2f}" +
              (f" ERROR {r['error']}" if r.get("error") else ""))
        if prof.is_file():
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(
                r"train_dreambooth_lora.py:\d+\((<module>|main|parse_args|log_validation|collate_fn|__getitem__)\)|"
                r"from_pretrained|save_lora_weights|load_lora_weights|init_trackers|end_training|"
                r"accelerator.py:\d+\((prepare|__init__|backward|log)\)|add_adapter|"
                r"\{method 'item'|unet_2d_condition.py:\d+\(forward\)|autoencoder_kl.py:\d+\(encode\)|"
                r"modeling_clip.py:\d+\(forward\)|optimizer.py:\d+\(wrapper\)", args.top)
    shutil.rmtree(work, ignore_errors=True)


def phases(args) -> None:
    root = Path(args.dreamlora_root).resolve()
    env = child_env(args.threads, root)
    work = Path(tempfile.mkdtemp(prefix="dreamlora-phases-"))
    inputs = scratch_inputs(work, args.model)
    n = args.phase_steps
    rows_all = []
    for rep in range(args.repeats):
        for small in (False, True) if args.phase_small_grid else (False,):
            out = work / f"run-{rep}-{int(small)}"
            out.mkdir()
            argv = dreamlora_command(inputs, n, out, small_grid=small)[3:]  # after `python -m cli`
            spec = {"argv": argv, "launch_time": time.time(),
                    "cprofile": str(work / "train.prof") if args.cprofile and rep == 0 and not small else None}
            log = work / f"phases-{rep}-{int(small)}.log"
            if args.wait_idle:
                wait_until_idle(args.wait_idle)
            spec["launch_time"] = time.time()
            r = timed([sys.executable, str(Path(__file__).resolve()), "--phases-worker", json.dumps(spec)], cwd=root,
                      env=env, log=log, timeout=args.timeout)
            exit_time = time.time()
            lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("PHASES ")]
            if r.get("error") or not lines:
                print(f"phases run failed: {r.get('error')}")
                continue
            p = json.loads(lines[-1][len("PHASES "):])
            rows_all.append((small, r, p, exit_time))
            if spec["cprofile"]:
                import pstats

                print(f"\ncProfile of run {rep} (cumulative, top {args.top}):")
                pstats.Stats(spec["cprofile"]).sort_stats("cumulative").print_stats(args.top)
    shutil.rmtree(work, ignore_errors=True)
    for small in sorted({s for s, *_ in rows_all}):
        runs = [(r, p, e) for s, r, p, e in rows_all if s == small]
        table: dict[str, list[float]] = {}
        for r, p, exit_time in runs:
            seconds = _phase_seconds(p, n)
            seconds["interpreter start-up (launch to the first line)"] = p["interpreter_s"]
            seconds["interpreter exit (after the command returned)"] = exit_time - p["end_time"]
            seconds["whole process (wall)"] = r["wall_s"]
            seconds["whole process (CPU)"] = r["cpu_s"]
            seconds["other processes' CPU meanwhile"] = r["others_cpu_s"]
            for k, v in seconds.items():
                table.setdefault(k, []).append(v)
        grid = "smallest final grid (1 prompt, 1 seed, 1 step)" if small else "default final grid"
        print(f"\ndreamlora train, {n} steps, {args.model} model, {grid}: seconds per phase, median [min-max] of "
              f"{len(runs)} runs, load {max(r['load_before'] for r, _, _ in runs):.2f}-"
              f"{max(r['load_after'] for r, _, _ in runs):.2f}\n")
        print("| phase | seconds |")
        print("|---|---|")
        for k, values in table.items():
            print(f"| {k} | {statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}] |")
    sys.stdout.flush()


def _phase_seconds(p: dict, n: int) -> dict[str, float]:
    """Inclusive seconds by label (a label called twice sums), the loop from the progress events, and the
    parts of the command and of train() that no wrapper covers."""
    out: dict[str, float] = {}
    for label, start, end in p["stamps"]:
        if label in ("train() in all",):
            continue
        out[label] = out.get(label, 0.0) + end - start
    whole_train = sum(end - start for label, start, end in p["stamps"] if label == "train() in all")
    train_start = min(start for label, start, _ in p["stamps"] if label == "train() in all")
    steps = {int(k): v for k, v in p["steps"].items()}
    prepared = max(end for label, _, end in p["stamps"] if label == "accelerator.prepare")
    loop = steps[n] - prepared
    steady = (steps[n] - steps[min(n, 5)]) / (n - min(n, 5)) if n > 5 else None
    out["training loop (all steps)"] = loop
    out["  of which step 1"] = steps[1] - prepared
    if steady:
        out["  steady s/step (steps 6..N)"] = steady
        out["  loop beyond N x steady s/step (warm-up)"] = loop - n * steady
    inside = [k for k in out if k not in ("training loop (all steps)",) and not k.startswith("  ")
              and not k.startswith("imports") and k != "config (flags, checks)"]
    out["train(): the rest (losses to the host, bookkeeping)"] = whole_train - loop - sum(out[k] for k in inside)
    t_cmd, t_end = p["t_cmd"], p["t_end"]
    config = out.get("config (flags, checks)", 0.0)
    first_import = min(start for label, start, _ in p["stamps"])
    out["command: typer parsing, progress bars, final echo"] = (t_end - t_cmd) - whole_train - config
    out["before imports (the benchmark's own)"] = first_import - p["t0"]
    out["  train() began at (s after the interpreter's first line)"] = train_start - p["t0"]
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", help="train_dreambooth_lora.py to run (default: the pinned one, fetched)")
    parser.add_argument("--diffusers-git", help="a diffusers clone (or bare git dir) holding the pinned commit")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="python with torchvision and tensorboard (see --make-reference-env)")
    parser.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                        help="run the script with `python script.py` (default) or `accelerate launch --cpu`")
    parser.add_argument("--report-to", default="tensorboard",
                        help="the script's --report_to (its default: tensorboard)")
    parser.add_argument("--dreamlora-root", default=str(ROOT),
                        help="run dreamlora's CLI from this checkout (e.g. a `git archive HEAD` of it)")
    parser.add_argument("--model", default="tiny", help="benchmark model (benchmarks/models.py): tiny or small")
    parser.add_argument("--steps", default="20,80", help="the two step counts (slope and intercept)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default="reference,dreamlora,dreamlora-small-grid")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for every run (default: the libraries' own)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    parser.add_argument("--json", help="append each run as a JSON line to this file")
    parser.add_argument("--summarize", metavar="JSON[,JSON]", help="print the tables of earlier --json files, pooled")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each run, wait up to S seconds for other processes to use under 1/4 core")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, outputs)")
    parser.add_argument("--imports", action="store_true", help="only the import cost of both commands")
    parser.add_argument("--phases", action="store_true", help="only dreamlora's fixed part, phase by phase")
    parser.add_argument("--phase-steps", type=int, default=20, help="steps of the --phases runs")
    parser.add_argument("--phase-small-grid", action="store_true", help="--phases: also with the smallest grid")
    parser.add_argument("--cprofile", action="store_true", help="--phases: cProfile the first run too")
    parser.add_argument("--reference-cprofile", action="store_true",
                        help="only the reference's run of --phase-steps steps under cProfile (its fixed part)")
    parser.add_argument("--top", type=int, default=15, help="rows of the import and cProfile listings")
    parser.add_argument("--make-reference-env", metavar="DIR", help="build the reference's virtualenv and exit")
    parser.add_argument("--phases-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases_worker:
        return phases_worker(json.loads(args.phases_worker))
    if args.make_reference_env:
        return make_reference_env(args.make_reference_env)
    args.steps = sorted(int(s) for s in args.steps.split(","))
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - {"reference", "dreamlora", "dreamlora-small-grid"}
    if unknown or len(args.steps) != 2 or args.steps[0] == args.steps[1]:
        fail(f"--sides takes reference, dreamlora, dreamlora-small-grid (got {sorted(unknown)}); "
             f"--steps two different counts")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    if args.imports:
        return import_cost(args)
    if args.phases:
        return phases(args)
    if args.reference_cprofile:
        return reference_profile(args)
    if args.summarize:  # the tables again from earlier --json files, pooled (their repetitions kept apart)
        results = []
        for index, name in enumerate(args.summarize.split(",")):
            with open(name, encoding="utf-8") as f:
                results += [{**r, "rep": index * 1000 + r["rep"]} for r in map(json.loads, f) if r]
        args.sides = [s for s in args.sides if any(r["side"] == s for r in results)]
    else:
        results = run_matrix(args)
    summarize(results, args.steps, args.sides)


if __name__ == "__main__":
    main()
