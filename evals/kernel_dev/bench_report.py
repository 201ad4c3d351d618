"""The benchmark's output: the table (`report`, with the kernel issue's targets), the PNG (`plot`), several runs' JSON
merged into one (`merge`), and the formatting helpers the runner's log lines share. Pure functions on the results
dict that `bench_mamba3.py` writes (no torch), so `bench_mamba3.py --from-json` re-renders without a GPU."""

from __future__ import annotations

# the rows the benchmark knows, in the order of its table and plot (bench_mamba3's --rows chooses among them)
MAMBA_ROWS = ("ours_mimo_r4", "ours_siso", "official_mimo_r4", "official_siso")
ALL_ROWS = MAMBA_ROWS + ("sdpa_layer", "sdpa_core")


def short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) < 600 else msg[:600] + " ..."



def one_line(s, n: int) -> str:
    return " ".join(str(s or "").split())[:n]



def fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x >= 1000:
        return f"{x:.0f}"
    if x >= 100:
        return f"{x:.1f}"
    return f"{x:.{nd}f}" if x >= 0.01 else f"{x:.2g}"


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def report(res) -> str:
    lines = []
    m = res.get("meta", {})
    lines.append(f"device: {m.get('gpu', m.get('device_type'))} ({m.get('sms', '?')} SMs), torch {m.get('torch')}, "
                 f"triton {m.get('triton')}, cuda {m.get('cuda')}; HBM copy {m.get('hbm_copy_gbps', '-')} GB/s; "
                 f"config {m.get('config')}")
    lines.append("")
    lines.append("Prefill / training, module per call (GPU = profiler kernel sum; wall = host clock w/ sync; "
                 "medians; peak = max_memory_allocated delta)")
    hdr = (f"{'row':<17} {'shape':<9} {'fwd GPU':>8} {'fwd wall':>9} {'f+b GPU':>8} {'f+b wall':>9} "
           f"{'host f/fb':>11} {'idle f/fb':>11} {'fwd MiB':>8} {'f+b MiB':>8} {'launch f/fb':>11} "
           f"{'1st f/fb s':>11}  note")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in res.get("forward", []):
        f, fb = r.get("fwd") or {}, r.get("fwd_bwd") or {}
        note = r.get("error") or "; ".join(x for x in (f.get("error"), fb.get("error")) if x) or \
            (r.get("last_backend") and f"backend={r['last_backend']}") or ""
        lf = f"{fmt(f.get('launches_per_call'), 0)}/{fmt(fb.get('launches_per_call'), 0)}"
        first = f"{fmt(r.get('first_call_s_fwd'))}/{fmt(r.get('first_call_s_fwd_bwd'))}" \
            if "first_call_s_fwd" in r else ""
        host = f"{fmt(f.get('host_ms'))}/{fmt(fb.get('host_ms'))}"
        idle = f"{fmt(f.get('gpu_idle_ms'))}/{fmt(fb.get('gpu_idle_ms'))}"
        lines.append(f"{r['row']:<17} {r['shape']:<9} {fmt(f.get('gpu_ms')):>8} {fmt(f.get('wall_ms')):>9} "
                     f"{fmt(fb.get('gpu_ms')):>8} {fmt(fb.get('wall_ms')):>9} {host:>11} {idle:>11} "
                     f"{fmt(f.get('peak_mib'), 0):>8} "
                     f"{fmt(fb.get('peak_mib'), 0):>8} {lf:>11} {first:>11}  {one_line(note, 110)}")
    lines.append("(ms; host = the host's cost of issuing one call, GPU kept busy; idle = GPU idle between a call's "
                 "first and last kernel: waiting on the host, plus ~1-2 us of launch latency each; launches = kernels "
                 "per call; 1st = first call of the row in the main process: see first_call_caches in the JSON)")
    if res.get("decode"):
        lines.append("")
        lines.append("Decode, one token per call (us): kernel = profiler kernel sum, graph = CUDA-graph replay, "
                     "wall = host loop; floors = bytes / measured copy bandwidth")
        hdr = (f"{'row':<17} {'variant':<24} {'batch':>5} {'kernel':>8} {'top k.':>8} {'graph':>8} {'wall':>8} "
               f"{'fl.state':>8} {'fl.layer':>8} {'k/floor':>7} {'g/floor':>7}  note")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in res["decode"]:
            lines.append(f"{r['row']:<17} {r['variant']:<24} {r['batch']:>5} {fmt(r.get('kernel_us')):>8} "
                         f"{fmt(r.get('top_kernel_us') or top_us(r)):>8} {fmt(r.get('graph_us')):>8} {fmt(r.get('wall_us')):>8} {fmt(r.get('floor_state_us')):>8} "
                         f"{fmt(r.get('floor_layer_us')):>8} {fmt(r.get('kernel_over_floor_ratio')):>7} "
                         f"{fmt(r.get('graph_over_floor_ratio')):>7}  {one_line(r.get('error'), 110)}")
        lines.append("(top k. = the costliest kernel alone, e.g. _step_kernel; floor ratio: layer_step against "
                     "fl.layer (state + in/out_proj weights), kernels against fl.state)")
    if res.get("cold_start"):
        lines.append("")
        lines.append("Cold start: fresh process, empty Triton/TileLang caches (s)")
        hdr = (f"{'row':<17} {'shape':<9} {'import':>7} {'build':>7} {'1st fwd':>8} {'2nd fwd':>8} {'1st f+b':>8} "
               f"{'2nd f+b':>8} {'to 1st f+b':>10}  note")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in res["cold_start"]:
            imp = (r.get("import_torch_s") or 0) + (r.get("import_impl_s") or 0) if "import_torch_s" in r else None
            lines.append(f"{r['row']:<17} {r['shape']:<9} {fmt(imp):>7} {fmt(r.get('build_s')):>7} "
                         f"{fmt(r.get('first_fwd_s')):>8} {fmt(r.get('second_fwd_s')):>8} "
                         f"{fmt(r.get('first_fwd_bwd_s')):>8} {fmt(r.get('second_fwd_bwd_s')):>8} "
                         f"{fmt(r.get('total_to_first_fwd_bwd_s')):>10}  {one_line(r.get('error'), 110)}")
    if res.get("unavailable"):
        lines.append("")
        for k, v in res["unavailable"].items():
            lines.append(f"unavailable: {k}: {one_line(v, 300)}")
    tg = targets(res)
    res["targets"] = tg
    if tg:
        lines.append("")
        lines.append("Targets (issue 3):")
        for t in tg:
            lines.append(f"  [{t['status']:<4}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def top_us(r):
    t = r.get("top_kernels")
    return t[0]["ms_per_call"] * 1000 if t else None


def targets(res) -> list[dict]:
    fw = {(r["row"], r["shape"]): r for r in res.get("forward", [])}
    out = []

    def g(row, shape, mode, key="gpu_ms"):
        return get(fw.get((row, shape)), mode, key)

    def add(target, ok, detail):
        out.append(dict(target=target, status="n/a" if ok is None else ("MET" if ok else "MISS"), detail=detail))

    for shape in ("b8x2048", "b1x32768"):
        a, o = g("ours_mimo_r4", shape, "fwd_bwd"), g("official_mimo_r4", shape, "fwd_bwd")
        add(f"MIMO fwd+bwd GPU <= 1/3 official MIMO at {shape}", None if a is None or o is None else a <= o / 3,
            f"ours {fmt(a)} ms vs official {fmt(o)} ms (ratio {fmt(a / o) if a and o else '-'}, need <= 0.33)")
    for shape in ("b8x2048", "b2x8192", "b1x32768"):
        a, o = g("ours_mimo_r4", shape, "fwd_bwd"), g("official_siso", shape, "fwd_bwd")
        add(f"MIMO fwd+bwd within 1.5x official SISO at {shape}", None if a is None or o is None else a <= 1.5 * o,
            f"ours MIMO {fmt(a)} ms vs official SISO {fmt(o)} ms GPU (ratio {fmt(a / o) if a and o else '-'})")
    for row in ("ours_mimo_r4", "ours_siso"):
        for mode in ("fwd", "fwd_bwd"):
            w, k = g(row, "b8x2048", mode, "wall_ms"), g(row, "b8x2048", mode)
            add(f"{row} {mode} wall within 10% of GPU at b8x2048", None if w is None or k is None else w <= 1.1 * k,
                f"wall {fmt(w)} ms vs GPU {fmt(k)} ms (wall/GPU {fmt(w / k) if w and k else '-'})")
    for r in res.get("cold_start", []):
        if r["row"].startswith("ours"):
            t = r.get("total_to_first_fwd_bwd_s")
            comp = None if t is None else (r.get("first_fwd_s") or 0) + (r.get("first_fwd_bwd_s") or 0)
            add(f"{r['row']} first call (compile) <= 60 s", None if comp is None else comp <= 60,
                f"first fwd + first fwd+bwd {fmt(comp)} s; process start to first fwd+bwd done {fmt(t)} s")
    for r in res.get("decode", []):
        if r["row"].startswith("ours") and r["batch"] == max(x["batch"] for x in res["decode"]):
            ratio = r.get("kernel_over_floor_ratio")
            add(f"{r['row']} {r['variant']} decode within 1.5x floor at batch {r['batch']}",
                None if ratio is None else ratio <= 1.5,
                f"kernel {fmt(r.get('kernel_us'))} us, graph {fmt(r.get('graph_us'))} us vs floor "
                f"{fmt(r.get('floor_layer_us') if r['variant'] == 'layer_step' else r.get('floor_state_us'))} us "
                f"(kernel/floor {fmt(ratio)})")
    return out


def plot(res, path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no PNG: matplotlib not importable ({e})"
    fw = [r for r in res.get("forward", []) if "error" not in r]
    rows = [r for r in ALL_ROWS if any(x["row"] == r for x in fw)]
    shapes = list(dict.fromkeys(x["shape"] for x in fw))
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    width = 0.8 / max(len(rows), 1)
    missing = {axes[0]: [], axes[1]: []}
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward + backward")):
        for i, row in enumerate(rows):
            vals = []
            for s in shapes:
                r = next((x for x in fw if x["row"] == row and x["shape"] == s), None)
                v = get(r, mode, "gpu_ms") or get(r, mode, "wall_ms")
                vals.append(v or 0)
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(shapes))]
            bars = ax.bar(xs, vals, width, label=row)
            for b_, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.3g}", (b_.get_x() + b_.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6, rotation=90)
            missing[ax].extend(x for x, v in zip(xs, vals) if not v)
        ax.set_xticks(range(len(shapes)), shapes)
        if any(b_.get_height() > 0 for b_ in ax.patches):
            ax.set_yscale("log")
        lo = ax.get_ylim()[0]
        for x in missing[ax]:  # a row measured elsewhere but not here (OOM, skipped, failed)
            ax.annotate("n/a", (x, lo), ha="center", va="bottom", fontsize=6, rotation=90, color="0.4")
        ax.set_ylabel("GPU kernel time per call (ms, log; wall where no GPU time)")
        ax.set_title(f"{title}: module GPU time")
    if rows:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(rows), fontsize=8, bbox_to_anchor=(0.33, 0.0))
    ax = axes[2]
    dec = [r for r in res.get("decode", []) if r.get("kernel_us") or r.get("graph_us") or r.get("wall_us")]
    labels = [f"{r['row'].replace('official', 'off')}\n{r['variant'].replace('_triton', '')} b{r['batch']}"
              for r in dec]
    xs = range(len(dec))
    ax.bar([x - 0.27 for x in xs], [r.get("kernel_us") or 0 for r in dec], 0.27, label="kernel sum")
    ax.bar([x for x in xs], [r.get("graph_us") or 0 for r in dec], 0.27, label="graph replay")
    ax.bar([x + 0.27 for x in xs], [r.get("wall_us") or 0 for r in dec], 0.27, label="wall (host loop)")
    fl = [(x, r.get("floor_layer_us") if r["variant"] == "layer_step" else r.get("floor_state_us"))
          for x, r in zip(xs, dec)]
    fl = [(x, y) for x, y in fl if y]
    if fl:
        ax.scatter([x for x, _ in fl], [y for _, y in fl], marker="_", s=400, color="k", label="memory floor",
                   zorder=3)
    ax.set_xticks(list(xs), labels, rotation=70, fontsize=6)
    if any(b_.get_height() > 0 for b_ in ax.patches):
        ax.set_yscale("log")
    ax.set_ylabel("us per decode step (log)")
    ax.set_title("decode step vs memory floor")
    if dec:
        ax.legend(fontsize=7)
    m = res.get("meta", {})
    fig.suptitle(f"Mamba-3 layer, d_model {m.get('config', {}).get('d_model')}, N128 P64, bf16 - "
                 f"{m.get('gpu', m.get('device_type'))}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return f"wrote {path}"


def merge(results: list[dict], names: list[str]) -> dict:
    """Several runs' JSON as one: later runs replace earlier rows with the same key (row, shape / variant,
    batch); rows that are only an error never replace a measured one. Each row keeps its run's device in `run`."""
    if len(results) == 1:
        return results[0]
    out = dict(meta=dict(results[0].get("meta", {})), method=results[0].get("method", ""), forward=[], decode=[],
               cold_start=[], unavailable={}, errors=[])
    out["meta"]["merged_from"] = [dict(file=n.strip(), gpu=r.get("meta", {}).get("gpu"),
                                       hbm_copy_gbps=r.get("meta", {}).get("hbm_copy_gbps"),
                                       elapsed_s=r.get("meta", {}).get("elapsed_s")) for n, r in zip(names, results)]
    keys = dict(forward=("row", "shape"), decode=("row", "variant", "batch"), cold_start=("row", "shape"))
    for sect, kk in keys.items():
        table = {}
        for i, r in enumerate(results):
            for row in r.get(sect, []):
                k = tuple(row.get(x) for x in kk)
                measured = "error" not in row
                if k not in table or measured or "error" in table[k]:
                    table[k] = dict(row, run=i)
        out[sect] = list(table.values())
    measured_rows = {r["row"] for r in out["forward"] if "error" not in r}
    for r in results:
        for k, v in r.get("unavailable", {}).items():
            if k not in measured_rows:
                out["unavailable"][k] = v
    return out


def safe_plot(res, path) -> str:
    try:
        return plot(res, path)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the figures
        return f"no PNG: plotting failed ({short_error(e)})"

