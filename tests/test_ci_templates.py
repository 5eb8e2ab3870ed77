"""The CI templates: their structure, and their exact shell steps run against a real
ttserver, so a template cannot drift from the CLI or the plugin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from helpers import ServerProcess, new_run_dir

ROOT = Path(__file__).resolve().parent.parent
GITLAB_COMPONENT = ROOT / "ci-templates/gitlab/templates/pytest.yml"
GITLAB_LEGACY = ROOT / "ci-templates/gitlab/ttstack-pytest.gitlab-ci.yml"
GH_ACTION = ROOT / "ci-templates/github/action.yml"
GH_WORKFLOW = ROOT / "ci-templates/github/workflows/ttstack-pytest.yml"
SUITE = Path(__file__).parent / "sample_ci"
GITLAB_INPUT = re.compile(r"\$\[\[\s*inputs\.(\w+)\s*\]\]")
GH_INPUT = re.compile(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}")


def gitlab_component() -> tuple[dict, str, dict]:
    """(inputs spec, job name, job) of the component."""
    spec, jobs = yaml.safe_load_all(GITLAB_COMPONENT.read_text())
    (name, job), = jobs.items()
    return spec["spec"]["inputs"], name, job


def gh_shell_steps(steps: list[dict]) -> list[dict]:
    return [s for s in steps if "run" in s]


# --- structure ---------------------------------------------------------------------------
def test_gitlab_component_declares_and_uses_its_inputs():
    inputs, name, job = gitlab_component()
    assert "default" not in inputs["server"], "the server address must be required"
    assert {"server", "os", "pytest_args", "python_version", "package"} <= set(inputs)
    used = set(GITLAB_INPUT.findall(GITLAB_COMPONENT.read_text().split("---", 1)[1]))
    assert used == set(inputs), f"declared but unused or used but undeclared: {used ^ set(inputs)}"
    assert job["artifacts"]["reports"]["junit"] == "report.xml"
    assert job["artifacts"]["when"] == "always"
    assert any("--junitxml=report.xml" in line for line in job["script"])
    assert any("pytest_ttstack.summary" in line for line in job["after_script"])


def test_gitlab_legacy_template_is_the_same_job():
    _, _, component = gitlab_component()
    legacy = yaml.safe_load(GITLAB_LEGACY.read_text())[".ttstack-pytest"]
    for key in ("script", "after_script", "artifacts"):
        assert legacy[key] == component[key], key
    assert set(legacy["variables"]) == set(component["variables"])


def test_github_action_is_composite_and_never_interpolates_into_shell():
    action = yaml.safe_load(GH_ACTION.read_text())
    assert action["runs"]["using"] == "composite"
    assert action["inputs"]["server"]["required"] is True
    steps = action["runs"]["steps"]
    for step in gh_shell_steps(steps):
        assert step["shell"] == "bash"
        assert "${{" not in step["run"], f"input interpolated into shell: {step['run']}"
    used = set(GH_INPUT.findall(GH_ACTION.read_text()))
    assert used == set(action["inputs"])
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "junit-file" in upload["with"]["path"]
    summary = next(s for s in steps if "pytest_ttstack.summary" in s.get("run", ""))
    assert "GITHUB_STEP_SUMMARY" in summary["run"] and summary["if"] == "always()"


def test_github_reusable_workflow_runs_the_action_steps():
    action = yaml.safe_load(GH_ACTION.read_text())
    workflow = yaml.safe_load(GH_WORKFLOW.read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    inputs = on["workflow_call"]["inputs"]
    assert set(action["inputs"]) <= set(inputs)
    (job,) = workflow["jobs"].values()
    assert gh_shell_steps(job["steps"]) == gh_shell_steps(action["runs"]["steps"])


# --- the shell steps, for real -------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_host() -> Iterator[tuple[ServerProcess, Path]]:
    """A ttserver, and a venv where the templates' `pip install` puts this checkout."""
    run_dir = new_run_dir("ci-")
    srv = ServerProcess(run_dir / "state", port_range="46000-46999").start()
    venv = run_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    yield srv, venv
    srv.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def run_lines(lines: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """Each line as the CI runner would: bash -e, in the job's directory."""
    outputs = []
    for line in lines:
        proc = subprocess.run(["bash", "-e", "-c", line], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    return outputs


def job_env(venv: Path, extra: dict[str, str]) -> dict[str, str]:
    # pip must not reach the network: the checkout builds with the installed setuptools
    return {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TT_CONFIG": "/nonexistent/tt.json",
            **extra}


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "job"
    shutil.copytree(SUITE, work)
    return work


def check_report(work: Path, summary: str, tests: int) -> None:
    report = (work / "report.xml").read_text()
    assert f'tests="{tests}"' in report and 'failures="0"' in report and 'errors="0"' in report
    assert "| `test_ci_sample::test_arch` | ✅ pass |" in summary, summary
    assert "`debian-12:x86_64`" in summary and f"{tests} passed" in summary


@pytest.mark.slow
@pytest.mark.vm
def test_gitlab_component_script_runs_against_a_real_server(ci_host, tmp_path: Path):
    srv, venv = ci_host
    inputs, _, job = gitlab_component()
    values = {k: v.get("default", "") for k, v in inputs.items()}
    values.update(server=srv.address, os="debian-12,debian-13:x86_64", package=str(ROOT),
                  pytest_args="-p no:cacheprovider")
    variables = {k: GITLAB_INPUT.sub(lambda m: values[m[1]], v)
                 for k, v in job["variables"].items()}
    work = workdir(tmp_path)
    env = job_env(venv, variables)
    run_lines(job["script"], env, work)
    summary = "".join(run_lines(job["after_script"], env, work))
    check_report(work, summary, tests=5)  # 2 VM tests x 2 OS + 1 plain


@pytest.mark.slow
@pytest.mark.vm
def test_github_action_steps_run_against_a_real_server(ci_host, tmp_path: Path):
    srv, venv = ci_host
    action = yaml.safe_load(GH_ACTION.read_text())
    values = {k: v.get("default", "") for k, v in action["inputs"].items()}
    values.update({"server": srv.address, "os": "debian-12", "package": str(ROOT),
                   "pytest-args": "-p no:cacheprovider"})
    work = workdir(tmp_path)
    summary_file = tmp_path / "step-summary.md"
    for step in gh_shell_steps(action["runs"]["steps"]):
        step_env = {k: GH_INPUT.sub(lambda m: values[m[1]], str(v))
                    for k, v in step.get("env", {}).items()}
        run_lines([step["run"]], job_env(venv, {**step_env,
                                                "GITHUB_STEP_SUMMARY": str(summary_file)}),
                  work)
    check_report(work, summary_file.read_text(), tests=3)
