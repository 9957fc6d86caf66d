"""The built wheel works on its own: fresh virtualenv, outside the source tree."""

from __future__ import annotations

import subprocess
import textwrap
import zipfile
from pathlib import Path

from asyncactions import migrate

from .conftest import Installed


def test_wheel_installs_into_a_fresh_virtualenv_and_runs(installed: Installed,
                                                        tmp_path: Path) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "asyncactions/migrations/versions/0001_initial.py" in names
    assert "asyncactions/migrations/env.py" in names
    assert "asyncactions/web/templates/overview.html" in names
    assert "asyncactions/web/static/app.js" in names

    app = tmp_path / "app"
    app.mkdir()
    (app / "jobs.py").write_text(textwrap.dedent("""
        from asyncactions import processor

        @processor("greet")
        def greet(action):
            return f"hello {action.data['name']}"
    """))
    asyncactions = installed.bin("asyncactions")
    assert f"is at revision {migrate.head()}" in installed.run(asyncactions, "db", "upgrade",
                                                               cwd=app).stdout
    installed.run(installed.bin("python"), "-c",
                  "from asyncactions import init_action; from sqlalchemy import create_engine; "
                  "init_action(create_engine('sqlite:///asyncactions.db'), 'greet', "
                  "{'name': 'wheel'})", cwd=app)
    installed.run(asyncactions, "worker", "--import", "jobs", "--burst", cwd=app)
    shown = installed.run(asyncactions, "show", "1", "--format", "json", cwd=app).stdout
    assert '"status": "completed"' in shown and '"result": "hello wheel"' in shown
    # Without the web extra, the dashboard says what to install, in one line.
    web = subprocess.run([asyncactions, "web"], cwd=app, capture_output=True, text=True)
    assert web.returncode == 2 and web.stderr.count("\n") == 1
    assert "pip install 'asyncactions[web]'" in web.stderr
