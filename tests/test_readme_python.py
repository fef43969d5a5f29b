"""README's Python example runs as written (from a temporary directory)."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, capsys):
    text = README.read_text()
    section = text[text.index("## Use it from Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example names shipped files by their repository paths: they resolve from anywhere
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "FID (domain)" in out and " 2000 " in out
    assert (tmp_path / "runs" / "export" / "generator.pt2").is_file()
