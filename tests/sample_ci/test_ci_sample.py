"""The suite tests/test_ci_templates.py runs through the CI templates' own shell steps."""


def test_arch(tt_vm):
    assert tt_vm.run("uname -m").stdout == "x86_64\n"


def test_os_release(tt_vm):
    assert f'VERSION_ID="{tt_vm.os.split("-")[-1]}"' in tt_vm.run("cat /etc/os-release").stdout


def test_without_vm():
    assert "ttstack".upper() == "TTSTACK"
