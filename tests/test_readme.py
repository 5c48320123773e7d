"""The README's Python API example runs as written (with fewer steps, to stay fast)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "run_batched" in code and "bilevel.run_steps" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("300", "5"), str(README), "exec"), namespace)
    assert namespace["final"]["outer_loss"].shape == (namespace["K"],)
    assert namespace["history"]["outer_loss"].shape == (namespace["K"], 5)
    assert (tmp_path / "runs" / "my-sweep" / "chunk_0001.npz").is_file()


def test_study_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "study.run_study" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert len(namespace["results"]) == 4 and (tmp_path / "runs" / "mini" / "summary.csv").is_file()
