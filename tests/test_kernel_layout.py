"""kernels/ reads top-down. Its modules' imports form no cycle (every relative import counts, those inside functions
too: that is where the forward once imported the backward), kernels/ imports nothing else of the package (kernels
know nothing of models), the Triton scan's forward and backward never import each other nor its interface module,
and every Triton kernel's docstring opens with its launch grid and tensor shapes."""

import ast
import re
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _imports() -> dict[str, set[str]]:
    """{module: the kernels/ modules it imports}, from the source (nothing imported)."""
    graph = {}
    for path in sorted(KERNELS.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import triton_scan
                    deps.update(alias.name for alias in node.names)
                else:
                    deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level > 1:
                deps.add("<outside kernels/>")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                deps.update("<outside kernels/>" for n in names if n.split(".")[0] == "hybrid_mamba3")
        graph[path.stem] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_cycle_finder():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kernel_imports_form_no_cycle():
    graph = _imports()
    assert {"triton_chunked", "triton_forward", "triton_backward", "triton_scan", "triton_tiles"} <= set(graph)
    assert _cycle(graph) is None
    for name, deps in graph.items():
        assert "<outside kernels/>" not in deps, name
        assert deps <= set(graph) | {"__init__"}, (name, deps - set(graph))


def test_forward_and_backward_import_only_downward():
    graph = _imports()
    assert "triton_backward" not in graph["triton_forward"] and "triton_forward" not in graph["triton_backward"]
    users = {name for name, deps in graph.items() if "triton_chunked" in deps}
    assert users <= {"__init__"}, users  # the interface is the top of the Triton op: nothing in kernels/ uses it
    assert graph["triton_tiles"] == set()  # the shared device functions depend on nothing of ours


def test_every_kernel_docstring_opens_with_grid_and_shapes():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                doc = ast.get_docstring(node) or ""
                head = "\n".join(doc.split("\n")[:3])
                assert doc.startswith("Grid ("), f"{path.name}:{node.name}: no grid on the first line"
                assert re.search(r"\[\w[^\]]*, [^\]]*\]", head), f"{path.name}:{node.name}: no [B, L, ...] shapes"


def _jit_functions() -> dict[str, ast.FunctionDef]:
    """Every `@triton.jit` function of kernels/, by name."""
    found = {}
    for path in sorted(KERNELS.glob("triton_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.dump(d) for d in node.decorator_list):
                found[node.name] = node
    return found


def _module_names(fn: ast.FunctionDef, jit: dict) -> tuple[set[str], set[str]]:
    """(the names fn reads that are neither its own nor `tl`, builtins or jit functions; the jit functions it calls)."""
    import builtins

    own = {a.arg for a in fn.args.args}
    own |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    read = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - own - {"tl", "triton"} - set(jit) - set(dir(builtins)), read & set(jit)


def test_the_decode_step_kernel_reads_no_module_globals():
    """torch.compile (inductor) rebuilds a user's Triton kernel from its source without the module's globals: the decode
    step, which generate() compiles with CUDA graphs, once failed on the GPU with "math is not defined" (math.pi in a
    helper). The step kernel and every jit function it reaches read no name but their own, `tl` and other jit
    functions. The check finds that math.pi on the old source."""
    jit = _jit_functions()

    def globals_reached(start: str) -> dict[str, set[str]]:
        seen, todo, found = set(), [start], {}
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            odd, calls = _module_names(jit[name], jit)
            if odd:
                found[name] = odd
            todo.extend(calls)
        return found

    assert "_step_kernel" in jit
    assert globals_reached("_step_kernel") == {}
    old = ast.parse("def _advance(angle_ptr, dt):\n    two_pi = 2.0 * math.pi\n    return two_pi * dt\n").body[0]
    assert _module_names(old, jit)[0] == {"math"}
