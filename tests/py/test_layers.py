"""The include layers (STYLE.md "Includes follow the layers", tools/check_includes.sh): apps include only the
public headers (and the named debug-hook exceptions), backends never engine or app headers. Run in `make test`
so that a layering slip fails CI instead of waiting for someone to run `make check-includes` (one had stayed
unnoticed: server/main.c's use of the debug hook for --debug-mtp-accept, now a named exception)."""
import subprocess

from conftest import ROOT


def test_includes_follow_the_layers():
    r = subprocess.run(["bash", str(ROOT / "tools" / "check_includes.sh")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check-includes: ok" in r.stdout


def test_check_includes_catches_an_app_reaching_into_the_engine(tmp_path):
    """The check itself fails on a violation: a copy of the tree's layout with one app file including model.h."""
    import shutil
    for d in ("cli", "server", "tools", "src/cpu", "src/cuda"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tools" / "check_includes.sh", tmp_path / "tools" / "check_includes.sh")
    (tmp_path / "cli" / "main.c").write_text('#include "ds4.h"\n#include "model.h"\n')
    (tmp_path / "server" / "main.c").write_text('#include "ds4.h"\n#include "ds4_debug.h"\n')
    r = subprocess.run(["bash", str(tmp_path / "tools" / "check_includes.sh")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "cli/main.c" in r.stdout, r.stdout
    assert "server/main.c" not in r.stdout, r.stdout
