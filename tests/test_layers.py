"""The package's import arrows all point one way: each module imports only its own layer and the layers below
(lazy imports inside functions included), no modules import each other in a circle, and argparse lives in the
command layer. The layer order is declared here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minimind"

# Bottom to top. A module belongs to the longest prefix that names it.
LAYERS = [
    ("core", ["minimind"]),  # config, model, tokenizer, chat, generation, checkpoint, tools, lora, inference, ...
    ("data", ["minimind.data"]),
    ("rl", ["minimind.rl"]),  # the rollout engine and rewards: a library the RL stages and probes use
    ("train", ["minimind.train"]),
    ("eval", ["minimind.eval"]),
    ("serve and export", ["minimind.serve", "minimind.export"]),
    ("recipes", ["minimind.recipes"]),  # the runs that produce the README's figures
    ("commands", ["minimind.commands", "minimind.cli", "minimind.__main__"]),
]
# Outside the command layer only the Streamlit page parses its own arguments (`streamlit run webui.py -- ...`).
ARGPARSE_ALLOWED = {"minimind.serve.webui"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def imports(path: Path) -> set[str]:
    """Every minimind module the file imports, at the top or inside a function ("from minimind import x"
    counts as importing minimind.x when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "minimind"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minimind":
            found.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                        (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").is_file():
                    found.add(sub)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_points_to_a_higher_layer():
    against = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
               for m, targets in graph().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_no_modules_import_each_other_in_a_circle():
    edges = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, "import circle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_argparse_only_in_the_command_layer():
    commands = next(i for i, (name, _) in enumerate(LAYERS) if name == "commands")
    users = [module_name(p) for p in sorted(PACKAGE.rglob("*.py")) if "argparse" in p.read_text(encoding="utf-8")]
    assert [m for m in users if layer(m) != commands and m not in ARGPARSE_ALLOWED] == []


def test_the_check_catches_an_arrow_against_the_order(tmp_path):
    """The walker sees a lazy import inside a function (the form that used to dodge the circle)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from minimind.serve.api import create_app\n    from minimind import chat\n")
    assert imports(f) == {"minimind.serve.api", "minimind", "minimind.chat"}
    assert layer("minimind.serve.api") > layer("minimind.train.loop") > layer("minimind.chat")
