"""What the component project's own pipeline runs through the component: one test on a
VM of each requested OS, one without a VM."""


def test_vm_answers(tt_vm):
    assert tt_vm.run("uname -s").stdout == "Linux\n"


def test_without_vm():
    assert "ttstack".upper() == "TTSTACK"
