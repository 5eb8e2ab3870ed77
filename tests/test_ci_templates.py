"""The CI templates, checked by the tools their platforms' users run and run for real:
check-jsonschema with its vendored GitHub and GitLab schemas, zizmor (offline), the
templates' structure, pytest_ttstack.ci (the steps they share), and against a real
ttserver: GitLab's component through gitlab-ci-local (shell executor), the GitHub
action's shell steps with a token."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytest_ttstack import ci

from helpers import ServerProcess, add_token, new_run_dir

ROOT = Path(__file__).resolve().parent.parent
GITLAB_PROJECT = ROOT / "ci-templates/gitlab"  # laid out as its own component project
GITLAB_COMPONENT = GITLAB_PROJECT / "templates/pytest.yml"
GITLAB_LEGACY = GITLAB_PROJECT / "ttstack-pytest.gitlab-ci.yml"
GH_ACTION = ROOT / "ci-templates/github/action.yml"
GH_WORKFLOW = ROOT / "ci-templates/github/workflows/ttstack-pytest.yml"
SUITE = Path(__file__).parent / "sample_ci"
GITLAB_INPUT = re.compile(r"\$\[\[\s*inputs\.(\w+)\s*\]\]")
GH_INPUT = re.compile(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}")
GITLAB_CI_LOCAL = "gitlab-ci-local"  # 4.60.0 from npm (scripts/setup-host.sh)


def gitlab_component() -> tuple[dict, str, dict]:
    """(inputs spec, job name, job) of the component."""
    spec, jobs = yaml.safe_load_all(GITLAB_COMPONENT.read_text())
    (name, job), = jobs.items()
    return spec["spec"]["inputs"], name, job


def gh_shell_steps(steps: list[dict]) -> list[dict]:
    return [s for s in steps if "run" in s]


def tool(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)


# --- the platforms' own checkers ------------------------------------------------------------
@pytest.mark.parametrize(("schema", "path"), [
    ("vendor.github-workflows", GH_WORKFLOW),
    ("vendor.github-actions", GH_ACTION),
    ("vendor.gitlab-ci", GITLAB_LEGACY),
    ("vendor.gitlab-ci", GITLAB_PROJECT / ".gitlab-ci.yml"),
])
def test_templates_validate_against_the_platform_schemas(schema, path):
    res = tool("check-jsonschema", "--builtin-schema", schema, str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_component_validates_document_by_document(tmp_path: Path):
    # a component is two YAML documents (spec, then jobs); check-jsonschema reads one
    head, body = GITLAB_COMPONENT.read_text().split("\n---\n", 1)
    for name, text in (("spec.yml", head), ("jobs.yml", body)):
        (tmp_path / name).write_text(text)
        res = tool("check-jsonschema", "--builtin-schema", "vendor.gitlab-ci",
                   str(tmp_path / name))
        assert res.returncode == 0, res.stdout + res.stderr


def test_zizmor_finds_nothing():
    res = tool("zizmor", "--offline", "--persona=pedantic", "--format=json", str(GH_ACTION),
               str(GH_WORKFLOW))
    findings = json.loads(res.stdout or "[]")
    assert findings == [], [(f["ident"], f["determinations"]["severity"]) for f in findings]


# --- structure --------------------------------------------------------------------------
def test_gitlab_component_inputs_are_typed_described_and_used():
    inputs, _, job = gitlab_component()
    assert "default" not in inputs["server"], "the server address must be required"
    assert {"server", "os", "pytest_args", "python_version", "package", "native",
            "native_install"} <= set(inputs)
    for name, spec in inputs.items():
        assert spec.get("type") in ("string", "boolean"), name
        assert spec.get("description"), name
    used = set(GITLAB_INPUT.findall(GITLAB_COMPONENT.read_text().split("---", 1)[1]))
    assert used == set(inputs), f"declared but unused or used but undeclared: {used ^ set(inputs)}"
    assert job["artifacts"]["reports"]["junit"] == "report.xml"
    assert job["artifacts"]["when"] == "always"
    assert {"ttstack-summary.html", "ttstack-summary.md"} <= set(job["artifacts"]["paths"])
    assert job["script"][-1] == "python -m pytest_ttstack.ci pytest"
    assert any("pytest_ttstack.ci report gitlab" in line for line in job["after_script"])


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("server", ["10.0.0.5:20002", "tt-proxy.lab:20000", "[fd00::5]:20000", "$TT_SERVER",
                "${TT_SERVER}"], ["10.0.0.5", "http://x:1", "x:1; rm -rf /", ""]),
    ("os", ["debian-12", "deb,debian-13:aarch64", "ubuntu2004"], ["", "deb, x", "a;b"]),
    ("python_version", ["3.11", "3.13"], ["3", "python3.11", "2.7"]),
    ("job_name", ["ttstack-pytest", "system tests: debian"], ["", "-x"]),
])
def test_gitlab_input_regexes(name, good, bad):
    # gitlab-ci-local does not apply `regex` (it warns); GitLab does, with RE2, whose
    # syntax these patterns keep to
    pattern = re.compile(gitlab_component()[0][name]["regex"])
    assert [v for v in good if not pattern.search(v)] == []
    assert [v for v in bad if pattern.search(v)] == []


def test_gitlab_legacy_template_is_the_same_job():
    _, _, component = gitlab_component()
    legacy = yaml.safe_load(GITLAB_LEGACY.read_text())[".ttstack-pytest"]
    for key in ("script", "after_script", "artifacts"):
        assert legacy[key] == component[key], key
    assert set(legacy["variables"]) == set(component["variables"])


def test_gitlab_component_project_layout():
    # the CI/CD Catalog wants templates/ and README.md at the project's root
    assert (GITLAB_PROJECT / "README.md").is_file()
    assert sorted(p.name for p in (GITLAB_PROJECT / "templates").iterdir()) == ["pytest.yml"]
    pipeline = yaml.safe_load((GITLAB_PROJECT / ".gitlab-ci.yml").read_text())
    (include,) = pipeline["include"]
    assert include["component"] == "$CI_SERVER_FQDN/$CI_PROJECT_PATH/pytest@$CI_COMMIT_SHA"
    assert pipeline["create-release"]["release"]["tag_name"] == "$CI_COMMIT_TAG"


USES = re.compile(r"^\s*(?:- )?uses: (.+)$", re.MULTILINE)  # not the comments' examples
PINNED = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+$")


def test_github_action_is_composite_pinned_and_never_interpolates_into_shell():
    action = yaml.safe_load(GH_ACTION.read_text())
    assert action["runs"]["using"] == "composite"
    assert action["inputs"]["server"]["required"] is True
    steps = action["runs"]["steps"]
    for step in gh_shell_steps(steps):
        assert step["shell"] == "bash"
        assert "${{" not in step["run"], f"input interpolated into shell: {step['run']}"
    used = set(GH_INPUT.findall(GH_ACTION.read_text()))
    assert used == set(action["inputs"])
    uses = USES.findall(GH_ACTION.read_text())
    assert uses and all(PINNED.match(u) for u in uses), uses
    pytest_step = next(s for s in steps if s.get("run") == "python -m pytest_ttstack.ci pytest")
    assert pytest_step["env"]["TT_TOKEN"] == "${{ inputs.token }}"
    report = next(s for s in steps if s.get("id") == "report")
    assert report["if"] == "always()" and report["run"].endswith("report github")
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "junit-file" in upload["with"]["path"]
    assert upload["with"]["name"] == "${{ steps.report.outputs.artifact-name }}"
    assert set(action["outputs"]) == {"passed", "failed", "errors", "skipped", "total",
                                      "junit-file", "artifact-name"}


def test_github_reusable_workflow_runs_the_action_steps_with_the_token_secret():
    action = yaml.safe_load(GH_ACTION.read_text())
    workflow = yaml.safe_load(GH_WORKFLOW.read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    call = on["workflow_call"]
    assert set(action["inputs"]) - {"token"} <= set(call["inputs"])
    assert call["secrets"]["TT_TOKEN"]["required"] is False
    assert set(call["outputs"]) == set(action["outputs"])  # "the same outputs"
    assert workflow["permissions"] == {}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read"}
    ours, theirs = gh_shell_steps(job["steps"]), gh_shell_steps(action["runs"]["steps"])
    assert [s["run"] for s in ours] == [s["run"] for s in theirs]
    for mine, its in zip(ours, theirs, strict=True):  # same variables; token: the secret
        assert set(mine.get("env", {})) == set(its.get("env", {}))
    assert ours[1]["env"]["TT_TOKEN"] == "${{ secrets.TT_TOKEN }}"
    uses = USES.findall(GH_WORKFLOW.read_text())
    assert len(uses) == 3 and all(PINNED.match(u) for u in uses), uses


# --- pytest_ttstack.ci: the steps the templates share ---------------------------------------
def test_pytest_argv_from_the_variables():
    argv = ci.pytest_argv({"TT_SERVER": " h:1 ", "TT_OS": "deb,debian-13",
                           "TT_PYTEST_ARGS": "-n 4 'tests/my dir' -k \"a or b\"",
                           "TT_NATIVE": "true", "TT_NATIVE_INSTALL": ".[test]\n\n-r req.txt\n"})
    assert argv == ["--tt-server=h:1", "--tt-os=deb,debian-13", "--junitxml=report.xml",
                    "--tt-native", "--tt-native-install=.[test]",
                    "--tt-native-install=-r req.txt", "-n", "4", "tests/my dir", "-k",
                    "a or b"]
    assert ci.pytest_argv({"TT_OS": "d", "TT_NATIVE": "false", "TT_JUNIT": "o.xml"}) == [
        "--tt-os=d", "--junitxml=o.xml"]
    for env, words in (({"TT_OS": ""}, "TT_OS is empty"),
                       ({"TT_OS": "d", "TT_NATIVE": "yes"}, "give true or false"),
                       ({"TT_OS": "d", "TT_PYTEST_ARGS": "'open"}, "TT_PYTEST_ARGS")):
        with pytest.raises(ci.UsageError, match=words):
            ci.pytest_argv(env)


def test_artifact_names_are_unique_per_job_and_inputs_and_uploadable():
    base = {"GITHUB_JOB": "system", "GITHUB_RUN_ATTEMPT": "2", "TT_OS": "debian-12:aarch64"}
    name = ci.artifact_name(base)
    assert name.startswith("ttstack-junit-system-debian-12_aarch64-") and name.endswith("-2")
    assert not re.search(r'[":<>|*?\\/]', name)
    others = [ci.artifact_name({**base, "TT_OS": "debian-13"}),
              ci.artifact_name({**base, "TT_PYTHON_VERSION": "3.12"}),  # a matrix leg
              ci.artifact_name({**base, "GITHUB_JOB": "other"}),
              ci.artifact_name({**base, "GITHUB_RUN_ATTEMPT": "3"})]
    assert len({name, *others}) == 5
    assert ci.artifact_name({**base, "TT_ARTIFACT_NAME": "mine/x:y"}) == "mine_x_y"


FAILING_SUITE = '''
def test_ok():
    pass

def test_bad():
    x = 1
    assert x == 2, "x is not 2,\\nreally: 100%"
'''


def test_report_github_annotates_failures_and_writes_summary_and_outputs(tmp_path: Path):
    (tmp_path / "test_demo.py").write_text(FAILING_SUITE)
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    "--junitxml=report.xml", "test_demo.py"], cwd=tmp_path,
                   capture_output=True, timeout=120)
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    env = {"TT_JUNIT": str(tmp_path / "report.xml"), "GITHUB_STEP_SUMMARY": str(summary),
           "GITHUB_OUTPUT": str(outputs), "GITHUB_JOB": "j", "TT_OS": "debian-12"}
    lines = ci.report("github", env)
    line_no = 1 + FAILING_SUITE.splitlines().index(
        "    assert x == 2, \"x is not 2,\\nreally: 100%\"")
    assert lines[0] == (f"::error file=test_demo.py,line={line_no},title=test_demo%3A%3A"
                        "test_bad::AssertionError: x is not 2,")
    assert lines[-1] == "ttstack: 1 passed, 1 failed"
    assert "| `test_demo::test_bad` | ❌ fail |" in summary.read_text()
    got = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert got["passed"] == "1" and got["failed"] == "1" and got["total"] == "2"
    assert got["artifact-name"].startswith("ttstack-junit-j-debian-12-")


def test_report_gitlab_writes_a_browsable_summary_even_without_a_report(tmp_path: Path):
    lines = ci.report("gitlab", {"TT_JUNIT": str(tmp_path / "missing.xml")}, out=tmp_path)
    assert lines == [f"ttstack: no JUnit report at {tmp_path / 'missing.xml'} ([Errno 2] "
                     f"No such file or directory: '{tmp_path / 'missing.xml'}'); see the "
                     "pytest step's log"]
    page = (tmp_path / "ttstack-summary.html").read_text()
    assert page.startswith("<!doctype html>") and "no JUnit report" in page
    assert ci.main(["report"], env={}) == 2 and ci.main(["nope"], env={}) == 2


def test_html_page_escapes():
    page = ci.html_page("### t\n\n| test | `os` |\n| --- | --- |\n| `<b>` | ✅ pass |\n", "x")
    assert "<td>&lt;b&gt;</td>" in page and "<th>os</th>" in page


# --- for real, against a ttserver ----------------------------------------------------------
@pytest.fixture(scope="module")
def ci_host() -> Iterator[tuple[ServerProcess, Path, str]]:
    """A ttserver that requires a token, a venv where the templates' `pip install` puts
    this checkout, and the token."""
    run_dir = new_run_dir("ci-")
    tokens = run_dir / "tokens"
    token = add_token(tokens, "ci")
    srv = ServerProcess(run_dir / "state", port_range="46000-46999",
                        extra=("--tokens-file", str(tokens))).start()
    srv.token = token
    venv = run_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    yield srv, venv, token
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
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TT_CONFIG": "/nonexistent/tt.json",
           **extra}
    for name in ("TT_SERVER", "TT_TOKEN"):  # only what the template passes
        if name not in extra:
            env.pop(name, None)
    return env


def test_the_component_projects_own_pipeline_parses_in_gitlab_ci_local(tmp_path: Path):
    project = git_project(tmp_path / "component", GITLAB_PROJECT)
    res = tool(GITLAB_CI_LOCAL, "--list", "--variable", "TT_SERVER=127.0.0.1:1", cwd=project)
    assert res.returncode == 0 and "component-test" in res.stdout, res.stdout + res.stderr


def git_project(path: Path, source: Path, *extra: tuple[str, Path]) -> Path:
    """A git repository at `path` holding `source`'s files and the `extra` (name, path)
    copies, committed, with a GitLab-like origin (gitlab-ci-local reads the project path
    and commit from git)."""
    shutil.copytree(source, path)
    for name, extra_path in extra:
        shutil.copytree(extra_path, path / name)
    git = ["git", "-C", str(path), "-c", "user.email=ci@tt.test", "-c", "user.name=ci"]
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "ci"],
                 ["remote", "add", "origin", "https://gitlab.tt.test/team/ttstack-ci.git"]):
        subprocess.run(git + argv, check=True, timeout=60)
    return path


CALLER = """\
include:
  - component: $CI_SERVER_FQDN/$CI_PROJECT_PATH/pytest@$CI_COMMIT_SHA
    inputs:
      server: $TT_TEST_SERVER
      os: debian-12,debian-13:x86_64
      pytest_args: -p no:cacheprovider 'sample tests'
      job_name: system tests
"""


@pytest.mark.slow
@pytest.mark.vm
def test_gitlab_component_runs_in_gitlab_ci_local(ci_host, tmp_path: Path):
    """A project including the component with inputs, run by gitlab-ci-local's shell
    executor against a real ttserver that wants a token (a masked TT_TOKEN variable)."""
    srv, venv, token = ci_host
    project = git_project(tmp_path / "project", GITLAB_PROJECT, ("sample tests", SUITE))
    (project / ".gitlab-ci.yml").write_text(CALLER)
    shutil.rmtree(project / "tests")  # the component project's own test
    subprocess.run(["git", "-C", str(project), "-c", "user.email=ci@tt.test", "-c",
                    "user.name=ci", "commit", "-qam", "caller"], check=True, timeout=60)
    env = job_env(venv, {})
    res = subprocess.run([GITLAB_CI_LOCAL, "--force-shell-executor", "--variable",
                          f"TT_TEST_SERVER={srv.address}", "--variable", f"TT_TOKEN={token}",
                          "--variable", f"TT_PACKAGE={ROOT}", "system tests"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=1200)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "ttstack: 5 passed on debian-12:x86_64, debian-13:x86_64" in log, log[-3000:]
    assert token not in log  # masked? gitlab-ci-local prints variables only when asked
    report = (project / "report.xml").read_text()
    assert report.count("<testcase ") == 5  # 2 VM tests x 2 OS + 1 without a VM
    summary = (project / "ttstack-summary.md").read_text()
    assert "| `sample tests.test_ci_sample::test_arch` | ✅ pass | ✅ pass |  |" in summary, \
        summary
    assert "<td>sample tests.test_ci_sample::test_arch</td>" in (
        project / "ttstack-summary.html").read_text()


@pytest.mark.slow
@pytest.mark.vm
def test_github_action_steps_run_against_a_real_server(ci_host, tmp_path: Path):
    srv, venv, token = ci_host
    action = yaml.safe_load(GH_ACTION.read_text())
    values = {k: v.get("default", "") for k, v in action["inputs"].items()}
    values.update({"server": srv.address, "os": "debian-12", "package": str(ROOT),
                   "pytest-args": "-p no:cacheprovider", "token": token})
    work = tmp_path / "job"
    shutil.copytree(SUITE, work)
    summary_file, outputs = tmp_path / "step-summary.md", tmp_path / "outputs"
    printed = []
    for step in gh_shell_steps(action["runs"]["steps"]):
        step_env = {k: GH_INPUT.sub(lambda m: values[m[1]], str(v))
                    for k, v in step.get("env", {}).items()}
        printed += run_lines([step["run"]], job_env(venv, {
            **step_env, "GITHUB_STEP_SUMMARY": str(summary_file), "GITHUB_OUTPUT": str(outputs),
            "GITHUB_JOB": "system-tests", "GITHUB_RUN_ATTEMPT": "1"}), work)
    report = (work / "report.xml").read_text()
    assert 'tests="3"' in report and 'failures="0"' in report and 'errors="0"' in report
    summary = summary_file.read_text()
    assert "| `test_ci_sample::test_arch` | ✅ pass |" in summary, summary
    assert printed[-1] == "ttstack: 3 passed on debian-12:x86_64\n"
    got = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert got["passed"] == "3" and got["failed"] == "0"
    assert got["artifact-name"].startswith("ttstack-junit-system-tests-debian-12-")


def test_odd_test_ids_keep_the_tables_whole():
    from pytest_ttstack.summary import Outcome, table

    md = table([Outcome("t::test_p[a|b]", "debian-12:x86_64", "passed"),
                Outcome("t::test_q[`x`]", "-", "failed")])
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert "| `t::test_p[a\\|b]` | ✅ pass |  |" in rows, md
    assert "| `` t::test_q[`x`] `` |  | ❌ fail |" in rows, md
    page = ci.html_page(md, "x")
    assert "<td>t::test_p[a|b]</td>" in page and "<td>t::test_q[`x`]</td>" in page


def test_the_report_step_never_fails_and_cannot_be_made_to_write_outputs(tmp_path: Path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuite><testcase classname="t" name="a" file="t.py" line="abc">'
                      '<failure message="boom">no location here</failure></testcase>'
                      '</testsuite>')
    outputs = tmp_path / "out"
    lines = ci.report("github", {"TT_JUNIT": f"{report}\nfailed=0",
                                 "GITHUB_OUTPUT": str(outputs)})
    assert lines[-1].startswith("ttstack: no JUnit report")  # that path does not exist
    assert github_outputs(outputs.read_text()) == {
        "passed": "0", "failed": "0", "errors": "0", "skipped": "0", "total": "0",
        "junit-file": f"{report}\nfailed=0",  # one value, not a second `failed`
        "artifact-name": ci.artifact_name({"TT_JUNIT": f"{report}\nfailed=0"})}
    lines = ci.report("github", {"TT_JUNIT": str(report),
                                 "GITHUB_STEP_SUMMARY": str(tmp_path / "no" / "dir")})
    assert lines[0] == "::error file=t.py,title=t%3A%3Aa::boom"  # line="abc": no line
    assert lines[1].startswith("ttstack: could not write the summary or outputs:")
    assert lines[-1] == "ttstack: 1 failed"


def github_outputs(text: str) -> dict[str, str]:
    """$GITHUB_OUTPUT read as the runner does (`k=v` lines and `k<<DELIM` blocks); a key
    given twice is an error here."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delimiter = line.split("<<", 1)
            value = []
            for more in lines:
                if more == delimiter:
                    break
                value.append(more)
            assert key not in out, key
            out[key] = "\n".join(value)
        else:
            key, value_text = line.split("=", 1)
            assert key not in out, key
            out[key] = value_text
    return out
