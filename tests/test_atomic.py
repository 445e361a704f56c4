"""Every writer goes through `converters.atomic`: whole files or nothing, modes from the umask.

Run in a child process with umask 027, so the expected modes (0640 files, 0750 directories) differ
from both mkstemp's 0600/0700 and the common default 0644/0755, and the test process's own umask is
never touched.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from converters.atomic import atomic_path, atomic_write_text
from tests.conftest import FIXTURES, ROOT

CHILD = textwrap.dedent("""
    import json, os, stat, sys
    from pathlib import Path
    os.umask(0o027)
    out = Path(sys.argv[1])
    fixtures = Path(sys.argv[2])
    from converters.atomic import atomic_write_json
    from converters.convert import mge_to_torch, torch_to_mge, torch_to_tf
    from bert_port import BertModel
    from bert_port.cache import write_manifest

    atomic_write_json(out / "plain.json", {"a": 1})
    mge_to_torch(fixtures / "mge" / "hub_bert.pkl", fixtures / "mge" / "bert_config.json", out / "converted",
                 vocab=None)
    torch_to_mge(out / "converted", out / "back.pkl")
    torch_to_tf(out / "converted", out / "tf" / "model.ckpt")
    BertModel.from_pretrained(out / "converted").save_pretrained(out / "saved")
    write_manifest(out / "saved", "saved", {})
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in sorted(out.rglob("*"))}
    print(json.dumps(modes))
""")


def test_files_and_directories_get_modes_from_the_umask(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(FIXTURES)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    modes = json.loads(r.stdout)
    assert {"plain.json", "converted/model.safetensors", "converted/config.json", "back.pkl", "tf/model.ckpt.index",
            "tf/model.ckpt.data-00000-of-00001", "saved/model.safetensors", "saved/config.json",
            "saved/bert_port_manifest.json"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert not wrong
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temp file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
