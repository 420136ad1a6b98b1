"""Optional dependency groups (workbench/extras.py): the README's set-up installs every extra; a command whose
extra is missing stops with one line naming it."""
import pytest

from workbench import extras
from workbench.cli import main


def test_the_set_up_installs_every_extra():
    assert {name: extras.missing(name) for name in extras.EXTRAS} == {name: [] for name in extras.EXTRAS}
    with pytest.raises(ValueError, match="extra must be one of"):
        extras.missing("gpu")


def test_a_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(extras.EXTRAS, "notebooks", ("papermill", "no_such_module_xyz"))
    with pytest.raises(extras.MissingExtraError, match=r"needs the 'notebooks' extra \(no_such_module_xyz not"):
        extras.require("notebooks", "the thing")
    assert main(["report", "00_quickstart", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "workbench report needs the 'notebooks' extra" in err and "pip install" in err
    monkeypatch.setitem(extras.EXTRAS, "dashboard", ("no_such_panel",))
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "workbench dashboard needs the 'dashboard' extra" in capsys.readouterr().err
