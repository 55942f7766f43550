"""The shape of the code: no import cycle inside distgan/ or kernels/ (imports inside functions
count too), and the kernels' reference knows nothing of the Triton path."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}; `from pkg import sub` is an edge to pkg.sub."""
    mods = {}
    for pkg in ("distgan", "kernels"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [n for n in subs if n in mods] or [base]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "distgan.trainer" in graph["distgan.cli"]  # the graph is really read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_reference_imports_no_triton_file():
    graph = import_graph()
    for op in ("minibatch", "spectral"):
        assert graph[f"kernels.{op}.reference"] == set()  # the ground truth knows nothing of the Triton path
        assert f"kernels.{op}.reference" in graph[f"kernels.{op}.triton"]


def variant_leaks(package: Path = ROOT / "distgan") -> list[str]:
    """'file:line what' for each place outside distgan/variants/ that names a variant (a string that is
    exactly a registered name, e.g. `cfg.variant.name == "cyclegan"`) or probes one with hasattr/getattr
    (the hooks and capabilities are declared on variants.base.Variant)."""
    from distgan import variants

    names = set(variants.REGISTRY)
    # the same word in another role: the schema's default variant, and SRGAN's discriminator architecture
    # (model.d.arch=srgan, which other image-to-image variants may use too)
    other_roles = {("config.py", "gan"), ("image2image.py", "srgan")}
    leaks = []
    for f in sorted(package.rglob("*.py")):
        if "variants" in f.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            where = f"{f.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                if (f.name, node.value) not in other_roles:
                    leaks.append(f"{where} names {node.value!r}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
            ):
                probed = ast.unparse(node.args[0]) if node.args else ""
                if "variant" in probed and not probed.endswith("cfg.variant"):  # (the config section is no variant)
                    leaks.append(f"{where} {ast.unparse(node)}")
    return leaks


def test_no_module_outside_variants_names_or_probes_a_variant():
    assert variant_leaks() == []


def test_the_variant_leak_finder_sees_names_and_probes(tmp_path):
    (tmp_path / "pkg" / "variants").mkdir(parents=True)
    code = 'def f(cfg, run):\n    return cfg.variant.name == "cyclegan" or hasattr(run.variant, "evaluate")\n'
    (tmp_path / "pkg" / "jobs.py").write_text(code)
    (tmp_path / "pkg" / "variants" / "mine.py").write_text(code)  # inside variants/: allowed
    leaks = variant_leaks(tmp_path / "pkg")
    assert (
        len(leaks) == 2
        and any("names 'cyclegan'" in x for x in leaks)
        and any("hasattr(run.variant" in x for x in leaks)
    ), leaks
