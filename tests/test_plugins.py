"""The user's own architectures through DNNPRUNE_PLUGINS: registered by importing their module, rebuilt from
the checkpoint in a new process, every command on them, and one clear line for every way the variable is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dnnprune.errors import ModelError
from dnnprune.models import accepts_argument, create_model, model_task, plugins, registry

_MODULE = '''
import torch, torch.nn as nn
from dnnprune.models import register_model

@register_model("{name}")
class UserNet(nn.Module):
    """A residual block, so that pruning has coupled channels to respect."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x).mean((2, 3)))
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for plugin modules; the registry and the imported set are restored afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "_imported", set())
    saved = dict(registry._REGISTRY), dict(registry._TASKS)
    before = set(sys.modules)
    yield folder
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._TASKS.clear()
    registry._TASKS.update(saved[1])
    for name in set(sys.modules) - before:
        if name.startswith("userplug"):
            del sys.modules[name]


def test_a_named_module_registers_its_architecture_when_a_name_is_missing(plugin_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (plugin_dir / "userplug_a.py").write_text(_MODULE.format(name="usernet_a"))
    monkeypatch.setenv(plugins.PLUGINS_VARIABLE, " userplug_a , ")
    assert model_task("usernet_a") == "classification"
    assert accepts_argument("usernet_a", "width") and not accepts_argument("usernet_a", "depth")
    model = create_model("usernet_a", num_classes=3, in_channels=2)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)


def test_without_the_variable_the_name_is_unknown_and_the_error_says_how_to_add_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(plugins.PLUGINS_VARIABLE, raising=False)
    with pytest.raises(ModelError, match="register your own with dnnprune.models.register_model in a module named by "
                                         "DNNPRUNE_PLUGINS"):
        create_model("usernet_missing")


def test_the_unknown_name_error_stays_one_short_line_when_plugins_register_hundreds(
        plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = ("from dnnprune.models import register_model\nimport torch.nn as nn\n"
              "for i in range(500):\n    register_model(f'usernet_many_{i}')(nn.Identity)\n")
    (plugin_dir / "userplug_many.py").write_text(source)
    monkeypatch.setenv(plugins.PLUGINS_VARIABLE, "userplug_many")
    with pytest.raises(ModelError) as caught:
        create_model("usernet_typo")
    message = str(caught.value)
    assert len(message) < 1000 and "more (dnnprune.models.list_models())" in message and "usernet_many_499" not in message


@pytest.mark.parametrize("source, spec, fragment", [
    (None, "userplug_none", "no module named 'userplug_none'; put the folder that holds it on PYTHONPATH"),
    (None, "./userplug.py", "'./userplug.py' is not a module name"),
    (None, "a b", "'a b' is not a module name"),
    ("import userplug_dependency_absent\n", "userplug_b", "it needs 'userplug_dependency_absent'; install that"),
    ("raise RuntimeError('boom\\nsecond line')\n", "userplug_b", "(RuntimeError: boom second line); fix that module"),
    ("def broken(:\n", "userplug_b", "(SyntaxError:"),
    ("from dnnprune.models import register_model\n@register_model('lenet5')\ndef f(): pass\n", "userplug_b",
     "model 'lenet5' is registered twice"),
    ("from dnnprune.models import register_model\n@register_model('torchvision.x')\ndef f(): pass\n", "userplug_b",
     "are torchvision's"),
    ("from dnnprune.models import register_model\n@register_model('x', task='segmentation')\ndef f(): pass\n",
     "userplug_b", "task must be one of classification, reconstruction"),
    ("import sys\nsys.exit('plugin says no')\n", "userplug_b", "called sys.exit('plugin says no')"),
])
def test_every_way_the_variable_can_be_wrong_is_one_error(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         source: str | None, spec: str, fragment: str) -> None:
    if source is not None:
        (plugin_dir / "userplug_b.py").write_text(source)
    monkeypatch.setenv(plugins.PLUGINS_VARIABLE, spec)
    with pytest.raises(ModelError, match="DNNPRUNE_PLUGINS") as caught:
        create_model("usernet_b")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("body, fragment", [
    ("raise RuntimeError('boom in ctor')", "building 'usernet_d' failed (RuntimeError: boom in ctor)"),
    ("return 3", "returned int, not a torch.nn.Module"),
])
def test_a_constructor_that_fails_or_builds_no_module_is_one_error(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   body: str, fragment: str) -> None:
    source = f"from dnnprune.models import register_model\n@register_model('usernet_d')\ndef build(**args):\n    {body}\n"
    (plugin_dir / "userplug_d.py").write_text(source)
    monkeypatch.setenv(plugins.PLUGINS_VARIABLE, "userplug_d")
    with pytest.raises(ModelError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        create_model("usernet_d")


def test_a_plugin_that_prints_leaves_stdout_to_the_json(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (plugin_dir / "userplug_e.py").write_text("print('HELLO FROM PLUGIN')\n" + _MODULE.format(name="usernet_e"))
    monkeypatch.setenv(plugins.PLUGINS_VARIABLE, "userplug_e")
    create_model("usernet_e")
    captured = capsys.readouterr()
    assert "HELLO" not in captured.out and "HELLO FROM PLUGIN" in captured.err


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dnnprune", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_a_user_architecture_goes_through_import_prune_quantize_info_and_reloads_in_a_new_process(tmp_path: Path) -> None:
    """The whole route a user takes with a model of their own, each step a new process that knows it only
    from the variable."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "userplug_c.py").write_text(_MODULE.format(name="usernet_c"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path]), plugins.PLUGINS_VARIABLE: "userplug_c"}
    sys.path.insert(0, str(folder))
    try:
        import userplug_c  # noqa: F401  (registers usernet_c here too, to write the weights)
        weights = tmp_path / "usernet.pt"
        torch.save(create_model("usernet_c", num_classes=10, in_channels=1).state_dict(), weights)
    finally:
        sys.path.remove(str(folder))
        registry._REGISTRY.pop("usernet_c", None)
        registry._TASKS.pop("usernet_c", None)
        sys.modules.pop("userplug_c", None)
    steps = [
        ["import", str(weights), "--arch", "usernet_c", "--input-shape", "1,16,16", "-o", "a.safetensors"],
        ["prune", "a.safetensors", "--ratio", "0.5", "--no-evaluate", "-o", "b.safetensors"],
        ["quantize", "b.safetensors", "--no-evaluate", "--bits", "4", "--layers", "type:Linear", "-o", "c.safetensors"],
        ["info", "c.safetensors", "--build", "--json"],
    ]
    for step in steps:
        done = _cli(step, env, tmp_path)
        assert done.returncode == 0, (step, done.stderr[-2000:])
    info = json.loads(done.stdout)
    assert info["arch"] == "usernet_c" and [row["command"] for row in info["lineage"]] == ["import", "prune", "quantize"]
    script = ("import dnnprune, torch; m = dnnprune.load('c.safetensors'); "
              "print(m.stem[0].out_channels, m.down[0].out_channels, tuple(m(torch.randn(2, 1, 16, 16)).shape))")
    rebuilt = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    stem, down, shape = rebuilt.stdout.split(maxsplit=2)
    assert int(stem) < 16 and int(down) < 32 and shape.strip() == "(2, 10)"
    without = _cli(["info", "c.safetensors"], {k: v for k, v in env.items() if k != plugins.PLUGINS_VARIABLE}, tmp_path)
    assert without.returncode == 2 and "Traceback" not in without.stderr
    assert without.stderr.startswith("error: c.safetensors: unknown architecture 'usernet_c': neither built in nor registered")
    assert "set DNNPRUNE_PLUGINS to the module that registers it" in without.stderr and without.stdout == ""
