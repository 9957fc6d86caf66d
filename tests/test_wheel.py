"""The built wheel works on its own: fresh virtualenv, outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

from asyncactions import migrate

from .conftest import ROOT


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_wheel_installs_into_a_fresh_virtualenv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist,
        ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("asyncactions-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "asyncactions/migrations/versions/0001_initial.py" in names
    assert "asyncactions/migrations/env.py" in names
    assert "asyncactions/web/templates/overview.html" in names
    assert "asyncactions/web/static/app.js" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    run(env_dir / "bin" / "pip", "install", "--quiet", wheel, cwd=tmp_path)

    app = tmp_path / "app"
    app.mkdir()
    (app / "jobs.py").write_text(textwrap.dedent("""
        from asyncactions import processor

        @processor("greet")
        def greet(action):
            return f"hello {action.data['name']}"
    """))
    asyncactions = env_dir / "bin" / "asyncactions"
    assert f"is at revision {migrate.head()}" in run(asyncactions, "db", "upgrade", cwd=app)
    run(env_dir / "bin" / "python", "-c",
        "from asyncactions import init_action; from sqlalchemy import create_engine; "
        "init_action(create_engine('sqlite:///asyncactions.db'), 'greet', {'name': 'wheel'})",
        cwd=app)
    run(asyncactions, "worker", "--import", "jobs", "--burst", cwd=app)
    shown = run(asyncactions, "show", "1", "--format", "json", cwd=app)
    assert '"status": "completed"' in shown and '"result": "hello wheel"' in shown
    # Without the web extra, the dashboard says what to install, in one line.
    web = subprocess.run([asyncactions, "web"], cwd=app, capture_output=True, text=True)
    assert web.returncode == 2 and web.stderr.count("\n") == 1
    assert "pip install 'asyncactions[web]'" in web.stderr
