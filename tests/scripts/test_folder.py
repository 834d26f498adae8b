"""scripts/ holds only commands a reader can find: every file answers `--help` (a library module run as a script prints
nothing and fails), the user commands are named in the README and the kernel workbench (scripts/dev/) in
docs/CONTRIBUTING.md."""
from tests.engine.conftest import ROOT
from tests.scripts.conftest import help_exits

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "scripts").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts)
DEV = "scripts/dev/"


def test_the_folder_holds_the_user_commands_and_the_workbench():
    assert {"scripts/validate.py", "scripts/bench_ops.py", "scripts/cuda_report.sh"} <= set(SCRIPTS)
    assert {f"{DEV}triton_sm90_report.py", f"{DEV}check_command.py"} <= set(SCRIPTS)
    assert {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "scripts").rglob("*.*")} == {"scripts", DEV[:-1]}


def test_every_script_answers_help():
    failed = {script: code for script, code in help_exits(SCRIPTS).items() if code != 0}
    assert not failed, failed


def test_every_script_is_documented():
    readme, contributing = (ROOT / "README.md").read_text(), (ROOT / "docs" / "CONTRIBUTING.md").read_text()
    missing = [s for s in SCRIPTS if s not in (contributing if s.startswith(DEV) else readme)]
    assert not missing, f"name these in the README (user commands) or docs/CONTRIBUTING.md (scripts/dev/): {missing}"
