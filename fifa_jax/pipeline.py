"""The stage runner: runs the configured stages in order, skips finished ones, resumes.

Each stage is a function `run(config, workdir) -> dict` in its own module. It reads its inputs
from `workdir/<upstream stage>/` and writes only into `workdir/<stage>/`. When it returns, the
runner writes `workdir/<stage>/STAGE_DONE.json` holding the stage's fingerprint: a hash of the
config sections the stage depends on (less its speed-only settings, `SPEED_ONLY`), of
its upstream stages' fingerprints and, for a stage that reads files outside the work directory
(ingest's data, score's models and ratings), of those files' sizes and times. Process 0 plans
which stages run and every host follows the plan. A later run skips
a stage whose done file carries the same fingerprint, so rerunning a command resumes it; a
changed config section changes the fingerprint and reruns the stage and everything downstream of
it. A stage whose summary reports `retryable_failures` (the score stage's judge requests that
failed in transport) is run again by the next call, reusing its finished work. Every finished
run also records a fresh `run_id` and the run ids of the upstream outputs it
read (`upstream_runs`), so an upstream stage that ran again (e.g. `--force`, or alone with
`config.stages`) reruns its downstream stages too, and a stage left out of `config.stages` whose
own inputs changed since it ran is refused as out of date instead of being read stale.
One run at a time per work directory: process 0 holds `WORKDIR/RUN.lock` (workdir_lock.py)
from planning to the end; a second run stops in one line naming the first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import pathlib
import time
import uuid
from typing import Sequence

from absl import logging

from fifa_jax.errors import ConfigError, InputError

DONE_FILE = "STAGE_DONE.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: str | None          # "pkg.module" with run(config, workdir); None = not built yet
    config_keys: tuple[str, ...]  # config sections the outputs depend on
    upstream: tuple[str, ...]   # stages whose outputs this one reads
    issue: str = ""             # where unbuilt work is tracked
    all_hosts: bool = True      # False: host-side work that only process 0 runs
    speed_only: tuple[str, ...] = ()  # "section.dotted.key" settings left out of fingerprints


# The pipeline's order: (stage name, module). Everything else about a stage is declared by its
# module (see `stage_from_module`), so adding a stage is one line here plus its module. The
# names are repeated here so that flag and config errors need no stage import (no jax).
PIPELINE: tuple[tuple[str, str | None], ...] = (
    ("ingest", "fifa_jax.data.ingest"),
    ("score", "fifa_jax.scoring.stage"),
    ("select", "fifa_jax.selection.stage"),
    ("encode", "fifa_jax.training.encode"),
    ("train", "fifa_jax.training.train"),
    ("export", "fifa_jax.training.export"),
    ("evaluate", "fifa_jax.evaluation.stage"),
    ("study", "fifa_jax.demo.study"),       # configs/demo_study.py: runs the above per method
)
UNBUILT: dict[str, str] = {}    # stage -> the work that will build it (none left)
STAGE_NAMES = tuple(n for n, _ in PIPELINE)


def stage_from_module(name: str, module_name: str) -> Stage:
    """A stage as its module declares it. Required module attributes: `STAGE` (the name),
    `SECTION` (its config section, made by `default_config()`), `CONFIG_KEYS` (the sections its
    outputs depend on), `UPSTREAM` (stages it reads), `run(config, workdir)`. Optional:
    `SPEED_ONLY` (dotted keys inside SECTION that only change speed), `ALL_HOSTS` (False:
    process 0 alone runs it), `RULES` (value rules, see `validate`), `check_config(section)`,
    `input_signature(config, workdir)`, `discard_resume_state(workdir)`."""
    module = importlib.import_module(module_name)
    declared = getattr(module, "STAGE", None)
    if declared != name:
        raise PipelineError(f"{module_name} declares STAGE = {declared!r}, expected {name!r}")
    section = module.SECTION
    return Stage(name, module_name, tuple(module.CONFIG_KEYS), tuple(module.UPSTREAM),
                 all_hosts=bool(getattr(module, "ALL_HOSTS", True)),
                 speed_only=tuple(f"{section}.{k}" for k in getattr(module, "SPEED_ONLY", ())))


def _build_stages() -> tuple[Stage, ...]:
    return tuple(stage_from_module(n, m) if m is not None
                 else Stage(n, None, (), (), UNBUILT.get(n, "")) for n, m in PIPELINE)


def __getattr__(attr):
    """`STAGES` and `STAGE_BY_NAME` are built on first use (they import the stage modules)."""
    if attr in ("STAGES", "STAGE_BY_NAME"):
        _stages()
        return globals()[attr]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _stages() -> tuple[Stage, ...]:
    if "STAGES" not in globals():
        stages = _build_stages()
        globals()["STAGES"] = stages
        globals()["STAGE_BY_NAME"] = {s.name: s for s in stages}
    return globals()["STAGES"]


def _by_name() -> dict[str, Stage]:
    _stages()
    return globals()["STAGE_BY_NAME"]


class PipelineError(RuntimeError):
    """A problem with the requested stages or the work directory (one clear line)."""


def parse_stages(spec: str | Sequence[str]) -> list[str]:
    """'ingest,score' -> ['ingest', 'score'] in pipeline order; unknown or unbuilt -> error.
    Imports no stage module (flag errors stay fast)."""
    known = [s.name for s in globals()["STAGES"]] if "STAGES" in globals() else STAGE_NAMES
    unbuilt_of = ({s.name: s.issue for s in globals()["STAGES"] if s.module is None}
                  if "STAGES" in globals() else UNBUILT)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise PipelineError("config.stages is empty; choose from " + ",".join(known))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown} in config.stages; known stages: "
                            + ",".join(known))
    unbuilt = [n for n in names if n in unbuilt_of]
    if unbuilt:
        what = "; ".join(f"{n} ({unbuilt_of[n]})" for n in unbuilt)
        raise PipelineError(f"stage(s) not built yet in this version of fifa_jax: {what}. "
                            f"Remove them from config.stages.")
    order = {n: i for i, n in enumerate(known)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def _stage_modules(stages):
    """(section, module) of each requested stage that is built, in pipeline order."""
    out = []
    for name, module_name in PIPELINE:
        if name in stages and module_name is not None:
            module = importlib.import_module(module_name)
            out.append((module.SECTION, module))
    return out


def validate(config) -> None:
    """Checks that need the whole config (called before any stage runs): each requested
    stage's section against the `RULES` and `check_config` its module declares, the mesh
    section (parallel/mesh.py) for every stage that uses devices, and the training resolution
    against the base model's config files (training/resolution.py)."""
    for key in ("seed", "stages"):
        if key not in config:
            raise ConfigError(f"config is missing the top-level key {key!r}")
    if not isinstance(config.seed, int):
        raise ConfigError(f"config key 'seed' must be an int, got {config.seed!r}")
    stages = config.stages.split(",") if isinstance(config.stages, str) else config.stages
    stages = [str(s).strip() for s in stages]
    checks = _stage_modules(stages)
    if any(getattr(m, "ALL_HOSTS", True) for _, m in checks):   # a stage that uses devices
        from fifa_jax.parallel import mesh
        checks.insert(0, ("mesh", mesh))
    for section, module in checks:
        if section not in config:
            continue
        _check_rules(section, config[section], getattr(module, "RULES", {}))
        if hasattr(module, "check_config"):
            module.check_config(config[section])
    if {"encode", "train"} & set(stages):     # the size against the base model's configs
        from fifa_jax.training import resolution
        resolution.check(config)


def _check_rules(section: str, node, rules: dict) -> None:
    for dotted, (kind, arg) in rules.items():
        value = node
        for part in dotted.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if value is None:
            continue
        key = f"{section}.{dotted}"
        if kind == "choice" and value not in arg:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(arg)}; "
                              f"got {value!r}")
        if kind == "min" and not value >= arg:
            raise ConfigError(f"config key '{key}' must be >= {arg}; got {value!r}")
        if kind == "size" and not (value == -1 or value >= 1):
            raise ConfigError(f"config key '{key}' must be -1 (the remaining devices) or >= 1; "
                              f"got {value!r}")


def _section(config, key):
    value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    return value.to_dict() if hasattr(value, "to_dict") else value


def _semantic(stage: Stage, key: str, section):
    """`section` (a plain dict) without the stage's speed-only settings, JSON-normalised.
    Settings that change how fast a stage runs, never what it writes, are left out, so that
    more threads or another chunk size do not redo hours of decoding and scoring."""
    section = json.loads(json.dumps(section, sort_keys=True, default=str))
    for dotted in stage.speed_only if isinstance(section, dict) else ():
        first, *parents, leaf = dotted.split(".")
        if first != key:
            continue
        node = section
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return section


def _config_changes(stage: Stage, done: dict, config) -> list[str]:
    """Config sections of `stage` whose settings differ from those its finished run used."""
    old = done.get("config") or {}
    return [k for k in stage.config_keys
            if _semantic(stage, k, old.get(k)) != _semantic(stage, k, _section(config, k))]


def input_signature(config, stage: Stage, workdir=None) -> dict:
    """The stage module's `input_signature(config, workdir)` (ingest: its data files' sizes and
    modification times; score: its model and rating files'), or {} for a stage that reads
    only the work directory."""
    if stage.module is None:
        return {}
    fn = getattr(importlib.import_module(stage.module), "input_signature", None)
    return fn(config, workdir) if fn is not None else {}


def fingerprint(config, stage: Stage, upstream_fps: dict[str, str], workdir=None) -> str:
    """sha256 over the stage's config sections, its upstream fingerprints and (when the stage
    reads files outside the work directory) its `input_signature`."""
    payload = {"stage": stage.name,
               "config": {k: _semantic(stage, k, _section(config, k)) for k in stage.config_keys},
               "upstream": {u: upstream_fps[u] for u in stage.upstream}}
    inputs = input_signature(config, stage, workdir)
    if inputs:
        payload["inputs"] = inputs
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_done(workdir: pathlib.Path, name: str) -> dict | None:
    path = workdir / name / DONE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logging.warning("ignoring unreadable %s", path)
        return None


def _write_done(workdir: pathlib.Path, name: str, record: dict) -> None:
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(out / DONE_FILE)


def _ancestors(names: Sequence[str]) -> set[str]:
    """Every stage that the stages `names` read from, directly or through other stages."""
    out, todo = set(), list(names)
    while todo:
        for u in _by_name()[todo.pop()].upstream:
            if u not in out:
                out.add(u)
                todo.append(u)
    return out


def _changed_inputs(stage: Stage, done: dict, fps: dict, runs: dict, ran: set) -> list[str]:
    """Upstream stages whose outputs differ from those `done` (a finished run) was made from."""
    up_fp = done.get("upstream") or {}
    up_run = done.get("upstream_runs") or {}
    return [u for u in stage.upstream
            if u in ran or (u in fps and up_fp.get(u) != fps[u])
            or (runs.get(u) is not None and up_run.get(u) != runs[u])]


def _start_devices(config) -> None:
    """Join the other hosts (jax.distributed) before anything touches a JAX backend: once
    `jax.process_count()` or a device list has been asked for, it is too late."""
    # imported here, not at the top: flag and config errors stay fast (no jax import)
    from fifa_jax.parallel import initialize_distributed
    mesh = config.get("mesh") if hasattr(config, "get") else getattr(config, "mesh", None)
    initialize_distributed(mesh.get("distributed", "auto") if mesh is not None else "auto")


def _compile_cache(config, workdir: pathlib.Path) -> str | None:
    """Turn on JAX's persistent compilation cache when `config.compile_cache` asks for it:
    "auto" = the folder in the JAX_COMPILATION_CACHE_DIR environment variable when it is set
    (one cache shared by every work directory), else WORKDIR/jax_cache; a path = that folder;
    "" = leave JAX's own setting. A rerun, a resumed run and runs of the same shapes (the
    study's) then load compiled steps instead of compiling."""
    spec = str(config.get("compile_cache", "") or "") if hasattr(config, "get") else ""
    if not spec:
        return None
    import jax
    if spec == "auto":
        spec = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(workdir / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", spec)
    return spec


def _process_index() -> int:
    import jax
    return jax.process_index()


def _plan(config, workdir: pathlib.Path, names: list[str], force: set[str]) -> dict:
    """Which stages run and which are skipped, decided from the config and the work directory
    alone (no stage runs here). Returns {"steps": [{stage, action: run|skip, fp, message}],
    "fps": {stage: fingerprint}, "runs": {stage: run id of its outputs, for skipped/read ones}}.
    Raises PipelineError for a missing or out-of-date input stage."""
    fps: dict[str, str] = {}
    runs: dict[str, str | None] = {}    # run id of the outputs each stage's readers will see
    planned: set[str] = set()           # stages this call will run
    steps = []
    needed = _ancestors(names)
    by_name = _by_name()
    for stage in _stages():
        if stage.name not in names:
            if stage.name in needed:
                done = read_done(workdir, stage.name)
                if done is None:
                    readers = [n for n in names if stage.name in by_name[n].upstream]
                    if not readers:
                        continue        # only read through another stage: nothing to check
                    raise PipelineError(
                        f"stage {readers[0]!r} needs the output of stage {stage.name!r}, which "
                        f"is not finished in {workdir}; add {stage.name!r} to config.stages")
                changed = _changed_inputs(stage, done, fps, runs, planned)
                if changed:
                    raise PipelineError(
                        f"stage {stage.name!r} in {workdir} is out of date: its input stage(s) "
                        f"{changed} changed since it ran; add {stage.name!r} to config.stages")
                sections = _config_changes(stage, done, config)
                if sections:
                    raise PipelineError(
                        f"stage {stage.name!r} in {workdir} ran with other settings in config "
                        f"section(s) {sections} than this config has; add {stage.name!r} to "
                        f"config.stages to rerun it, or use the config it ran with")
                fps[stage.name] = done["fingerprint"]
                runs[stage.name] = done.get("run_id")
            continue
        fp = fingerprint(config, stage, fps, workdir)
        fps[stage.name] = fp
        done = read_done(workdir, stage.name)
        changed = _changed_inputs(stage, done, fps, runs, planned) if done is not None else []
        retry = int(((done or {}).get("summary") or {}).get("retryable_failures") or 0)
        if (done is not None and done.get("fingerprint") == fp and not changed
                and stage.name not in force and not retry):
            steps.append({"stage": stage.name, "action": "skip", "fp": fp, "done": done,
                          "message": f"[{stage.name}] skipped: finished at "
                                     f"{done.get('finished_at')} with the same config "
                                     f"(fingerprint {fp}); outputs in {workdir / stage.name}"})
            runs[stage.name] = done.get("run_id")
            continue
        message = None
        if done is not None and done.get("fingerprint") != fp:
            message = (f"[{stage.name}] config or input files changed since the last run "
                       f"({done.get('fingerprint')} -> {fp}): running again")
        elif changed:
            message = (f"[{stage.name}] input stage(s) {changed} ran again since the last run: "
                       f"running again")
        elif retry and stage.name not in force:
            message = (f"[{stage.name}] its last run left {retry} retryable failure(s): running "
                       f"again to retry them (finished work is reused)")
        steps.append({"stage": stage.name, "action": "run", "fp": fp, "message": message})
        planned.add(stage.name)
    return {"steps": steps, "fps": fps, "runs": runs}


def _plan_on_leader(make_plan) -> dict:
    """`make_plan()` on process 0, told to every host (JSON), so that all hosts take the same
    decisions even when their views of the files differ (local checkpoint copies, stale NFS
    attributes). A PipelineError on process 0 is raised on every host."""
    import jax
    from fifa_jax.parallel import hosts
    if jax.process_count() == 1:
        return make_plan()
    failure, blob = None, ""
    if jax.process_index() == 0:
        try:
            blob = json.dumps({"plan": make_plan()}, default=str)
        except Exception as e:  # noqa: BLE001 (told to every host, then raised here too)
            failure = e
            what = str(e) if isinstance(e, PipelineError) else (
                f"planning failed on process 0: {type(e).__name__}: {e}")
            blob = json.dumps({"error": what})
    got = json.loads(hosts.bytes_from_leader(blob.encode()).decode())
    if failure is not None:
        raise failure
    if "error" in got:
        raise PipelineError(got["error"])
    return got["plan"]


def run_pipeline(config, workdir: str | pathlib.Path, *, force: Sequence[str] = (),
                 echo=print) -> dict[str, dict]:
    """Run `config.stages` in order in `workdir`; returns {stage: status record}.

    Args:
      config: the experiment ConfigDict (has `stages` and one section per stage).
      workdir: the work directory (created).
      force: stage names to rerun from scratch even when finished with the same fingerprint.
      echo: where one-line progress messages go.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = parse_stages(config.stages)
    force = set(parse_stages(force)) if force else set()
    if force - set(names):
        raise PipelineError(
            f"--force names stage(s) {sorted(force - set(names))} that this run does not run "
            f"(config.stages = {','.join(names)}); add them to config.stages")
    _start_devices(config)      # hosts join first: process 0 decides for all of them
    with _workdir_lock(workdir, echo):
        return _run_stages(config, workdir, names, force, echo)


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, echo):
    """Process 0 holds WORKDIR/RUN.lock for the run (workdir_lock.py); every host learns
    whether it got it, so a second run on the directory stops everywhere in one line."""
    from fifa_jax import workdir_lock
    from fifa_jax.parallel import hosts
    record, refusal = None, ""
    if _process_index() == 0:
        try:
            record = workdir_lock.acquire(workdir, echo)
        except workdir_lock.LockedError as e:
            refusal = str(e)
    refusal = hosts.bytes_from_leader(refusal.encode()).decode()
    if refusal:
        raise PipelineError(refusal)
    try:
        yield
    finally:
        if record is not None:
            workdir_lock.release(workdir, record)


def _run_stages(config, workdir: pathlib.Path, names: list[str], force: set[str],
                echo) -> dict[str, dict]:
    _compile_cache(config, workdir)
    from fifa_jax.parallel import hosts
    plan = _plan_on_leader(lambda: _plan(config, workdir, names, force))
    fps, runs = plan["fps"], plan["runs"]
    results: dict[str, dict] = {}
    leader = _process_index() == 0
    for step in plan["steps"]:
        stage = _by_name()[step["stage"]]
        fp = step["fp"]
        if step["action"] == "skip":
            echo(step["message"])
            results[stage.name] = {"status": "skipped", **step["done"]}
            continue
        if step["message"]:
            echo(step["message"])
        hosts.barrier(f"{stage.name}:start")
        module = importlib.import_module(stage.module)
        if leader:
            (workdir / stage.name / DONE_FILE).unlink(missing_ok=True)
            # --force means "compute again", not "resume": drop what a resume would reuse
            # (also after a killed run, which left partial results but no done file)
            if stage.name in force and hasattr(module, "discard_resume_state"):
                module.discard_resume_state(workdir)
                echo(f"[{stage.name}] forced: discarded its resumable partial results")
        hosts.barrier(f"{stage.name}:cleared")
        echo(f"[{stage.name}] running (fingerprint {fp})")
        start = time.time()
        summary, error = {}, None
        try:
            if stage.all_hosts or leader:
                summary = module.run(config, workdir) or {}
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other hosts)
            error = e
        # A host-side stage runs on process 0 only: the others must learn that it failed, or
        # they would wait at the next barrier until the coordination service times out.
        if (not stage.all_hosts and bool(hosts.from_leader([error is not None])[0])
                and error is None):
            raise PipelineError(f"stage {stage.name!r} failed on process 0 (its log has the "
                                f"error); stopping process {_process_index()} too")
        if isinstance(error, (InputError, FileNotFoundError)):  # bad input: one line
            raise PipelineError(f"stage {stage.name!r} failed on its input: {error}") from error
        if error is not None:
            raise error
        hosts.barrier(f"{stage.name}:end")
        record = {"fingerprint": fp, "stage": stage.name,
                  "seconds": round(time.time() - start, 3),
                  "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "config": {k: _section(config, k) for k in stage.config_keys},
                  "upstream": {u: fps[u] for u in stage.upstream},
                  "run_id": uuid.uuid4().hex,
                  "upstream_runs": {u: runs.get(u) for u in stage.upstream},
                  "summary": summary}
        runs[stage.name] = record["run_id"]
        if leader:
            _write_done(workdir, stage.name, record)
        hosts.barrier(f"{stage.name}:done")
        echo(f"[{stage.name}] done in {record['seconds']:.1f} s: "
             + json.dumps(summary, sort_keys=True, default=str)[:400])
        results[stage.name] = {"status": "ran", **record}
    return results
