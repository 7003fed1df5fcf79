"""Turns the suite's results into RESULTS.md (tables, targets) and PNG plots."""

from __future__ import annotations

import pathlib
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT = "1 lane AESGCM"
WINDOW = 64 << 20  # serve()'s default window: bytes in flight per migration


def _per_gb(cpu: float, image: int) -> str:
    return f"{cpu / (image / 1e9):.2f}" if image else "-"


def _floors(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["workload"]: r for r in rows if r["tool"] == "floor" and not _failed(r)}


def _failed(r: dict[str, Any]) -> bool:
    return any(not e.startswith("median of") for e in r["errors"]) or not r["downtime"]


def _note(r: dict[str, Any]) -> str:
    bits = []
    if r.get("reported_downtime") is not None:
        bits.append(f"{len(r['iterations'])} iterations; own clock "
                    f"{r['reported_downtime']:.3f} s")
    bits += r["errors"]
    return "; ".join(bits).replace("|", "/")


def tools_table(rows: list[dict[str, Any]]) -> list[str]:
    floors = _floors(rows)
    out = ["| workload | tool | downtime (s) | x floor | TCP client gap (s) | total (s) | "
           "wire (MB) | CPU source (s/GB) | CPU destination (s/GB) | destination peak RSS "
           "(MiB) | notes |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        f = floors.get(r["workload"])
        image = f["image"] if f else r["image"]
        ratio = f"{r['downtime'] / f['downtime']:.2f}" if f and not _failed(r) else "-"
        out.append(f"| {r['workload']} | {r['tool']} | {r['downtime']:.3f} | {ratio} | "
                   f"{r['tcp_gap']:.3f} | {r['total']:.2f} | {r['wire'] / 1e6:.1f} | "
                   f"{_per_gb(r['cpu_src'], image)} | "
                   f"{_per_gb(r['cpu_dst'], image)} | {r['rss_dst'] / 2**20:.0f} | {_note(r)} |")
    return out


def _targets(res: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    failures: list[str] = []
    rows = res.get("tools", []) + res.get("sweep", []) + res.get("sizes", [])
    failures += [f"{r['workload']}: {r['tool']}: {r['errors']}" for r in rows if _failed(r)]
    floors = _floors(res.get("tools", []))
    for r in res.get("tools", []):
        if r["tool"] != f"ctlive {DEFAULT}" or _failed(r) or r["workload"] not in floors:
            continue
        w = r["workload"]
        same = {x["tool"]: x for x in res["tools"] if x["workload"] == w and not _failed(x)}
        ratio = r["downtime"] / floors[w]["downtime"]
        lines.append(f"| downtime <= 1.2x floor, {w} | {ratio:.2f}x ({r['downtime']:.3f} s vs "
                     f"{floors[w]['downtime']:.3f} s) | {'yes' if ratio <= 1.2 else 'no'} |")
        for other in ("criu page-server", "podman export/import"):
            if other in same:
                o = same[other]["downtime"]
                lines.append(f"| downtime below {other}, {w} | {r['downtime']:.3f} s vs "
                             f"{o:.3f} s | {'yes' if r['downtime'] < o else 'no'} |")
    dp = res.get("dataplane")
    if dp:
        best = min(dp["pipeline"], key=lambda p: p["seconds"])
        x = dp["plain_copy_s"] / best["seconds"]
        lines.append(f"| data plane >= 1.0x plain loopback copy ({dp['mib']} MiB corpus, "
                     f"{dp['dumps']} dumps) | {x:.2f}x (best: {best['lanes']} lane(s) "
                     f"{best['cipher']}) | {'yes' if x >= 1.0 else 'no'} |")
        worst = max(w / f for w, f in zip(best["wire"], dp["floor"], strict=True) if f)
        lines.append(f"| wire bytes per iteration <= 1.2x XOR+zstd floor | worst iteration "
                     f"{worst:.2f}x | {'yes' if worst <= 1.2 else 'no'} |")
    sizes = [r for r in res.get("sizes", []) if r["tool"].startswith("ctlive") and not _failed(r)]
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        grow = hi["rss_dst"] - lo["rss_dst"]
        lines.append(f"| receiver peak RSS flat in image size | {lo['rss_dst'] / 2**20:.0f} MiB "
                     f"at {lo['workload'].split(',')[0]}, {hi['rss_dst'] / 2**20:.0f} MiB at "
                     f"{hi['workload'].split(',')[0]} (window {WINDOW >> 20} MiB) | "
                     f"{'yes' if grow <= WINDOW else 'no'} |")
    return lines, failures


def _plots(res: dict[str, Any], out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    rows = [r for r in res.get("tools", []) if not _failed(r)]
    if rows:
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        names = list(dict.fromkeys(r["tool"] for r in rows))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [next((r["downtime"] for r in rows if r["workload"] == w and r["tool"] == name),
                       0.0) for w in workloads]
            ax.bar([j + i * width for j in range(len(workloads))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads,
                      fontsize=8)
        ax.set_ylabel("downtime seen by the client (s)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("Downtime per workload and tool")
        fig.tight_layout()
        fig.savefig(out / "downtime.png", dpi=110)
        plt.close(fig)
        made.append("downtime.png")
    dp = res.get("dataplane")
    if dp:
        total = dp["image_bytes"]
        labels = list(dp["stages"]) + ["plain loopback copy"] + [
            f"pipeline {p['lanes']}L {p['cipher']}" for p in dp["pipeline"]]
        secs = list(dp["stages"].values()) + [dp["plain_copy_s"]] + [
            p["seconds"] for p in dp["pipeline"]]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.barh(labels, [total / s / 1e9 for s in secs],
                color=["tab:blue"] * len(dp["stages"]) + ["tab:gray"]
                + ["tab:green"] * len(dp["pipeline"]))
        ax.set_xlabel("image GB/s (bytes of dumped image per second)")
        ax.set_title("Data plane: each stage alone (one core) and end to end")
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=110)
        plt.close(fig)
        best = min(dp["pipeline"], key=lambda p: p["seconds"])
        fig, ax = plt.subplots(figsize=(7, 4))
        idx = range(len(dp["floor"]))
        ax.bar([i - 0.2 for i in idx], [w / 1e6 for w in best["wire"]], 0.4, label="ctlive wire")
        ax.bar([i + 0.2 for i in idx], [f / 1e6 for f in dp["floor"]], 0.4,
               label="XOR+zstd floor")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("MB")
        ax.legend()
        ax.set_title("Wire bytes per iteration")
        fig.tight_layout()
        fig.savefig(out / "wire.png", dpi=110)
        plt.close(fig)
        made += ["stages.png", "wire.png"]
    sizes = [r for r in res.get("sizes", []) if r["tool"].startswith("ctlive") and not _failed(r)]
    if sizes:
        mib = [int(r["workload"].split()[1]) for r in sizes]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(mib, [r["rss_dst"] / 2**20 for r in sizes], "o-", label="receiver peak RSS")
        ax.plot(mib, [r["rss_idle"] / 2**20 for r in sizes], "s--", label="receiver idle RSS")
        ax.plot(mib, mib, ":", color="gray", label="image size")
        ax.set_xlabel("workload memory (MiB)")
        ax.set_ylabel("MiB")
        ax.legend()
        ax.set_title("Receiver memory against image size")
        fig.tight_layout()
        fig.savefig(out / "rss.png", dpi=110)
        plt.close(fig)
        made.append("rss.png")
    return made


def phases_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where each ctlive row's downtime went (its own stage timers), and whether the
    client's longest gap was the final phase or an earlier pre-copy freeze."""
    L = ["| workload | tool | client gap (s) | own clock (s) | final dump | diff + send | "
         "verify | restore | kill + commit + resume | longest gap was | dumps (freeze s) |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in rows:
        ph = r.get("phases") or {}
        if not r["tool"].startswith("ctlive") or _failed(r) or "dump" not in ph:
            continue
        start = ph.get("gap_from", 0.0)
        where = ("the final phase" if start > -0.05 else
                 f"a pre-copy freeze {-start:.1f} s before it")
        # A live read (no CRIU stats, no freeze) shows as 0.
        dumps = ", ".join("0" if not it["final"] and not it.get("frozen_s")
                          else f"{it.get('frozen_s') or it['dump_s']:.2f}"
                          for it in r["iterations"])
        L.append(f"| {r['workload']} | {r['tool']} | {r['downtime']:.3f} | "
                 f"{r['reported_downtime']:.3f} | {ph['dump']:.3f} | {ph['send']:.3f} | "
                 f"{ph.get('dst_verify', 0.0):.3f} | {ph.get('dst_restore', 0.0):.3f} | "
                 f"{ph.get('kill', 0.0) + ph.get('commit', 0.0):.3f} | {where} | {dumps} |")
    return L


def headline(res: dict[str, Any]) -> list[str]:
    """The short table README shows: each workload's downtime per tool (median rows of
    the tools section), and the bytes each tool sent."""
    rows = res.get("tools", [])
    out = ["| workload | floor (local dump + restore) | CRIU page-server | podman export/import "
           "| ctlive (1 lane, AES-GCM) | ctlive wire vs page-server |",
           "|---|--:|--:|--:|--:|--:|"]
    for w in dict.fromkeys(r["workload"] for r in rows):
        by = {r["tool"]: r for r in rows if r["workload"] == w}

        def gap(tool: str, by: dict[str, dict[str, Any]] = by) -> str:
            r = by.get(tool)
            return "failed" if r is None or _failed(r) else f"{r['downtime']:.2f} s"

        c, ps = by.get(f"ctlive {DEFAULT}"), by.get("criu page-server")
        wire = (f"{c['wire'] / 1e6:.0f} MB vs {ps['wire'] / 1e6:.0f} MB" if c and ps else "-")
        out.append(f"| {w} | {gap('floor')} | {gap('criu page-server')} | "
                   f"{gap('podman export/import')} | {gap(f'ctlive {DEFAULT}')} | {wire} |")
    return out


def update_readme(res: dict[str, Any], readme: pathlib.Path) -> bool:
    """Replace the table between README's benchmark markers; False without markers."""
    begin, end = "<!-- bench:headline -->", "<!-- /bench:headline -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    table = "\n".join(headline(res))
    readme.write_text(f"{head}{begin}\n{table}\n\n_{res['date']}, `{res['command'].strip()}`; "
                      f"downtime is the client's longest gap between replies._\n{end}{tail}")
    return True


def render(res: dict[str, Any], plot_dir: pathlib.Path | None) -> tuple[str, list[str]]:
    """(RESULTS.md text, failed rows)."""
    m = res["machine"]
    targets, failures = _targets(res)
    plots = _plots(res, plot_dir) if plot_dir is not None else []
    L = ["# ctlive benchmark results", ""]
    if res["quick"]:
        L += ["**Quick mode: tiny workloads for CI. These figures are not to be quoted.**", ""]
    L += [f"Produced by `{res['command'].strip()}` (as root, after `scripts/setup`) on "
          f"{res['date']}, in {res['seconds'] / 60:.0f} min.", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; kernel {m['kernel']}; "
          f"CRIU {m['criu']}; {m['podman']}; {m['redis']}; Python {m['python']}. No SEV "
          "hardware: the receiver attests with the simulated SNP platform.", "",
          *([f"Memory write speed into tmpfs: {m['memory_speed']} (recycled: "
             "memory freed a moment before; cold: freed seconds before, which this VM has "
             "handed back to its host by then). See the analysis at the end.", ""]
            if m.get("memory_speed") else []),
          "## Targets", "", *targets, ""]
    if "tools" in res:
        L += ["## 1. Every workload, every tool", "",
              "Downtime is what the workload's own clients saw: the longest gap between two "
              "replies of its UDP echo port, probed every 10 ms (redis: of its TCP writer, "
              "every 2 ms). The TCP client gap (one request every 20 ms on a connection that "
              "must survive) is longer by TCP's retransmission backoff: requests sent while "
              "the workload is frozen are dropped and resent 0.2, 0.6, 1.4 s after. CPU is per GB "
              "of the floor's checkpoint image of the same workload. Rows are the median of "
              "the runs noted.", "", *tools_table(res["tools"]), ""]
        if "downtime.png" in plots:
            L += ["![downtime per workload and tool](results/downtime.png)", ""]
        phases = phases_table(res["tools"] + res.get("sweep", []) + res.get("sizes", []))
        if len(phases) > 2:
            L += ["### Where ctlive's downtime goes", "",
                  "ctlive's own stage timers for each row above and below (source clock, "
                  "seconds): the final dump, its diff and transfer, the destination's last "
                  "verification and CRIU restore, then kill, COMMIT and resume. The last "
                  "columns say whether the client's longest gap was this final phase or the "
                  "freeze of an earlier pre-copy iteration, and how long each iteration "
                  "froze the workload (0: a live read of its memory, which does not freeze "
                  "it; see docs/backends.md).", "", *phases, ""]
    if "sweep" in res:
        L += ["## 2. Dirty rate and bytes per dirtied page", "",
              "The mutating workload; 'dirty' is the fraction of its pages written per second "
              "(distinct pages), each with the given number of new random bytes.", "",
              *tools_table(res["sweep"]), ""]
    if "sizes" in res:
        L += ["## 3. Image size and receiver memory", "",
              "ctlive's receiver runs in a process of its own; its peak RSS (VmHWM) against "
              "the workload's size. Its images live on tmpfs (guest memory in a real SNP "
              "guest), outside the process's RSS. Source dumps above 1 GiB go to /var/tmp "
              "(disk), so that the machine's 24 GiB hold workload, dumps and the restored copy.",
              "", *tools_table(res["sizes"]), ""]
        if "rss.png" in plots:
            L += ["![receiver RSS against image size](results/rss.png)", ""]
    dp = res.get("dataplane")
    if dp:
        total = dp["image_bytes"]
        L += ["## 4. The data plane alone", "",
              f"Corpus: {dp['dumps']} successive full dumps of the mutating workload "
              f"({dp['mib']} MiB, mixed pages), one second apart, {total / 1e6:.0f} MB in all. "
              "ctlive's pipeline (read, diff, compress, encrypt, loopback, decrypt, "
              "decompress, write and verify) is timed until the destination verified the "
              "last dump; the plain copy sends every file of every dump over a loopback "
              "socket and writes it out.", "",
              "Each path ran three times, interleaved; the median, and every run.", "",
              "| path | seconds (median) | image GB/s | x plain copy | runs (s) |",
              "|---|--:|--:|--:|---|",
              f"| plain loopback socket copy | {dp['plain_copy_s']:.3f} | "
              f"{total / dp['plain_copy_s'] / 1e9:.2f} | 1.00 | "
              + ", ".join(f"{x:.2f}" for x in dp.get("plain_copy_all", [])) + " |"]
        for p in dp["pipeline"]:
            L.append(f"| ctlive, {p['lanes']} lane(s), {p['cipher']} | {p['seconds']:.3f} | "
                     f"{total / p['seconds'] / 1e9:.2f} | "
                     f"{dp['plain_copy_s'] / p['seconds']:.2f} | "
                     + ", ".join(f"{x:.2f}" for x in p.get("all", [])) + " |")
        L += ["", "Each stage alone, one core:", "", "| stage | seconds | image GB/s |",
              "|---|--:|--:|"]
        for name, s in dp["stages"].items():
            L.append(f"| {name} | {s:.3f} | {total / s / 1e9:.2f} |")
        best = min(dp["pipeline"], key=lambda p: p["seconds"])
        L += ["", "Wire bytes per iteration against the XOR+zstd floor (zstd-1 of the XOR of "
              "exactly the changed pages, matched by process and address, plus zstd-1 of "
              "each changed non-page file):", "",
              "| iteration | image (MB) | ctlive wire (bytes) | floor (bytes) | ratio |",
              "|---|--:|--:|--:|--:|"]
        for k, (w, f) in enumerate(zip(best["wire"], dp["floor"], strict=True)):
            L.append(f"| {k} | {dp['per_dump'][k] / 1e6:.1f} | {w} | {f} | "
                     f"{w / f if f else float('nan'):.2f} |")
        L.append("")
        for name in ("stages.png", "wire.png"):
            if name in plots:
                L += [f"![{name[:-4]}](results/{name})", ""]
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists() and not res["quick"]:
        L += [analysis.read_text().rstrip(), ""]
    return "\n".join(L), failures
