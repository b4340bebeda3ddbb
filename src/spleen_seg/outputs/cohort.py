"""The cohort QA page ``index.html``: one row per case of a batch, opened from the file system.

The page is one self-contained file (inline CSS and JavaScript, no network, no server): the
summary rows are embedded as JSON and a small script lists them, sortable by clicking a
column (the quality score too: ``pipeline.quality``; and the reviewer's verdict, summary.csv's
``review`` column written by ``spleen-seg review``), filterable by text, status, flag (``review
suggested`` among them), review state and volume outliers, 500 rows per page. The state
lives in the URL's fragment (``index.html#sort=-volume&status=failed``), so a view can be
bookmarked or opened by a headless browser. Thumbnails and links are relative paths into
each case's folder, so the output folder can be moved or copied as a whole.

Volume outliers use the modified z-score of Iglewicz and Hoaglin (1993):
``z = 0.6745 (v - median) / MAD`` over the volumes of the cases with a spleen; ``|z| > 3.5``
is an outlier. Median and MAD ignore the outliers themselves, unlike mean and SD, which a
few failed segmentations of a cohort would drag along. Nothing is flagged when the MAD is 0.

Text from the rows (case ids, paths, error messages: all user-controlled) reaches the page
only through ``JSON.parse`` and ``textContent``/``setAttribute``, never as markup; the JSON
block has ``<``, ``>`` and ``&`` escaped so it cannot close its ``<script>`` element.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from spleen_seg.io.atomic import atomic_write_text

PAGE_FILENAME = "index.html"
MAD_TO_SIGMA = 0.6745  # the MAD of a normal distribution is 0.6745 sigma
OUTLIER_Z = 3.5
ROWS_PER_PAGE = 500
FLAG_SEVERAL_COMPONENTS = "several_components"
FLAG_LABELS = {
    "touches_border": "touches border",
    "probable_header_flip": "probable header flip",
    "non_ct_intensity": "non-CT intensities",
    FLAG_SEVERAL_COMPONENTS: "several components",
    "splenomegaly": "splenomegaly",
    "review_suggested": "review suggested",
}
# Characters that could end the JSON's <script> element or start markup, as JSON escapes.
_PLACEHOLDER = re.compile(r"\{\{(title|data)\}\}")
JSON_IN_SCRIPT = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                  0x2028: "\\u2028", 0x2029: "\\u2029"}


@dataclass(frozen=True)
class CaseFiles:
    """File names inside each case's folder that the page shows or links (relative to the folder)."""

    thumbnail: str
    preview: str
    links: tuple[tuple[str, str], ...]  # (label, file name); "" links the folder itself


@dataclass(frozen=True)
class VolumeStats:
    median_ml: float | None
    mad_ml: float | None
    cases: int


def robust_z(volumes_ml: Sequence[float | None]) -> tuple[list[float | None], VolumeStats]:
    """Modified z-score of each volume against the median and MAD of the given (non-None) volumes.

    ``None`` stays ``None`` (no spleen, failed). All z are None when fewer than 3 volumes are
    given or their MAD is 0 (most volumes equal): no outlier can be told apart then.
    """
    present = np.array([v for v in volumes_ml if v is not None], dtype=np.float64)
    if present.size < 3:
        return [None] * len(volumes_ml), VolumeStats(None, None, int(present.size))
    median = float(np.median(present))
    mad = float(np.median(np.abs(present - median)))
    stats = VolumeStats(median, mad, int(present.size))
    if mad == 0.0:
        return [None] * len(volumes_ml), stats
    return [None if v is None else round(MAD_TO_SIGMA * (v - median) / mad, 3) for v in volumes_ml], stats


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def page_data(rows: Sequence[Mapping[str, str]], files: CaseFiles, title: str, expected: int | None) -> dict[str, Any]:
    """What the page's script reads: one compact list per row, the cohort statistics, the file names.

    ``rows`` are ``summary.csv`` rows (column name -> text).
    """
    volumes = [_number(row.get("volume_ml")) for row in rows]
    with_spleen = [v if row.get("status") == "ok" and v else None for row, v in zip(rows, volumes, strict=True)]
    z_scores, stats = robust_z(with_spleen)
    table = []
    for row, volume, z in zip(rows, volumes, z_scores, strict=True):
        flags = [flag for flag in (row.get("flags") or "").split(";") if flag]
        components = _number(row.get("components"))
        if components is not None and components > 1:
            flags.append(FLAG_SEVERAL_COMPONENTS)
        table.append([row.get("case", ""), row.get("status", ""), volume, z,
                      None if components is None else int(components), flags, row.get("error", ""),
                      row.get("source", ""), row.get("reused") == "yes", _number(row.get("quality_score")),
                      row.get("review_suggested") == "yes", row.get("review") or ""])
    return {
        "title": title, "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "expected": expected, "rows_per_page": ROWS_PER_PAGE, "flag_labels": FLAG_LABELS,
        "stats": {"median_ml": stats.median_ml, "mad_ml": stats.mad_ml, "cases": stats.cases, "outlier_z": OUTLIER_Z},
        "files": {"thumbnail": files.thumbnail, "preview": files.preview, "links": [list(link) for link in files.links]},
        "rows": table,
    }


def cohort_page(rows: Sequence[Mapping[str, str]], *, files: CaseFiles, title: str, expected: int | None = None) -> str:
    """The page's HTML for ``summary.csv`` rows (see the module docstring)."""
    data = json.dumps(page_data(rows, files, title, expected), ensure_ascii=False, separators=(",", ":"))
    values = {"title": html.escape(title), "data": data.translate(JSON_IN_SCRIPT)}
    # One pass, so that a title or a case id holding "{{data}}" is never substituted again.
    return _PLACEHOLDER.sub(lambda match: values[match[1]], _TEMPLATE)


def is_cohort_page(head: bytes) -> bool:
    """Does a file starting with ``head`` start as every version of this page did, up to its title?

    How a batch recognises its own ``index.html`` before replacing it (``batch.ownership``).
    """
    return head.startswith(_TEMPLATE[: _TEMPLATE.index("{{title}}")].encode())


def write_cohort_page(rows: Sequence[Mapping[str, str]], dest: Path, *, files: CaseFiles, title: str,
                      expected: int | None = None) -> Path:
    """Write :func:`cohort_page` to ``dest`` atomically (a browser reloading it never sees half a page)."""
    atomic_write_text(dest, cohort_page(rows, files=files, title=title, expected=expected))
    return dest


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>spleen-seg cohort: {{title}}</title>
<style>
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#fff}
header{position:sticky;top:0;z-index:1;background:#f5f5f7;border-bottom:1px solid #d2d2d7;padding:10px 16px}
h1{margin:0 0 4px;font-size:18px}
#overview,#showing{margin:0 0 6px;color:#3a3a3c}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center}
.controls input[type=search]{width:260px}
table{border-collapse:collapse;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid #e5e5ea;text-align:left;vertical-align:middle}
th{background:#fafafa;font-weight:600;white-space:nowrap}
th[data-sort]{cursor:pointer;color:#0b57d0}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.case{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all;max-width:260px}
td.reason{color:#b3261e;max-width:420px;word-break:break-word}
img.thumb{display:block;width:300px;height:auto;min-height:40px;background:#000}
tr.status-failed td,tr.status-interrupted td{background:#fdecea}
tr.outlier td{background:#fff3c4}
td.quality.review{color:#b3261e;font-weight:600}
.badge{display:inline-block;margin:1px 3px 1px 0;padding:1px 7px;border-radius:10px;font-size:12px;background:#e8e8ed}
.badge.flag{background:#ffe3bf}
.badge.outlier{background:#ffd54f;font-weight:600}
tr.status-ok .badge.status{background:#d7f5dd}
.badge.verdict.accepted{background:#d7f5dd}
.badge.verdict.rejected{background:#f9c7c2}
.badge.verdict.corrected{background:#cfe3ff}
tr.status-failed .badge.status,tr.status-interrupted .badge.status{background:#f9c7c2;font-weight:600}
#pager{padding:10px 16px}
#pager button{margin-right:8px}
</style>
</head>
<body>
<header>
<h1>spleen-seg cohort: {{title}}</h1>
<p id="overview"></p>
<div class="controls">
<label>filter <input id="q" type="search" placeholder="case, path, error, flag"></label>
<label>status <select id="status"><option value="">all</option><option value="ok">ok</option>
<option value="not_found">not found</option><option value="failed">failed</option>
<option value="interrupted">interrupted</option></select></label>
<label>flag <select id="flag"><option value="">any</option></select></label>
<label>review <select id="verdict"><option value="">any</option><option value="none">not reviewed</option>
<option value="accepted">accepted</option><option value="rejected">rejected</option>
<option value="corrected">corrected</option></select></label>
<label><input id="outliers" type="checkbox"> volume outliers only</label>
</div>
<p id="showing"></p>
</header>
<noscript><p>This page lists the cases with JavaScript; summary.csv beside it holds the same rows.</p></noscript>
<table id="cases">
<thead><tr><th data-sort="case">case</th><th>preview</th><th data-sort="volume">volume (mL)</th>
<th data-sort="z">robust z</th><th data-sort="quality" title="fraction of the mask and its boundary the network was unsure about (0 = sure)">quality score</th>
<th data-sort="status">status</th><th data-sort="verdict" title="the reviewer's verdict (spleen-seg review)">review</th>
<th>flags</th><th>reason</th><th>files</th></tr></thead>
<tbody id="case-rows"></tbody>
</table>
<div id="pager"><button id="previous" type="button">previous</button><button id="next" type="button">next</button>
<span id="page"></span></div>
<script type="application/json" id="cohort-data">{{data}}</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cohort-data").textContent);
  var C = {case: 0, status: 1, volume: 2, z: 3, components: 4, flags: 5, error: 6, source: 7, reused: 8, quality: 9,
           review: 10, verdict: 11};
  var SORTABLE = {case: C.case, volume: C.volume, z: C.z, quality: C.quality, status: C.status, verdict: C.verdict};
  var body = document.getElementById("case-rows");
  var $ = function (id) { return document.getElementById(id); };

  function params() { return new URLSearchParams(location.hash.replace(/^#/, "")); }
  function state() {
    var p = params(), sort = p.get("sort") || "case", desc = sort.charAt(0) === "-";
    if (desc) { sort = sort.slice(1); }
    if (!Object.prototype.hasOwnProperty.call(SORTABLE, sort)) { sort = "case"; desc = false; }
    return {sort: sort, desc: desc, q: (p.get("q") || "").toLowerCase(), status: p.get("status") || "",
            flag: p.get("flag") || "", verdict: p.get("verdict") || "", outliers: p.get("outliers") === "1",
            page: Math.max(1, parseInt(p.get("page") || "1", 10) || 1)};
  }
  function setParam(name, value) {
    var p = params();
    if (value) { p.set(name, value); } else { p.delete(name); }
    if (name !== "page") { p.delete("page"); }
    location.hash = p.toString();
  }
  function isOutlier(r) { return r[C.z] !== null && Math.abs(r[C.z]) > data.stats.outlier_z; }
  function compare(key, desc) {
    var i = SORTABLE[key];
    return function (a, b) {
      var x = a.row[i], y = b.row[i];
      if (x === null || y === null) { return x === y ? a.index - b.index : (x === null ? 1 : -1); }
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return (desc ? -c : c) || a.index - b.index;
    };
  }
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function link(href, text) { var a = el("a", "", text); a.setAttribute("href", href); return a; }
  function folder(r) { return encodeURIComponent(r[C.case]) + "/"; }

  function rowElement(r) {
    var done = r[C.status] === "ok" || r[C.status] === "not_found";
    var tr = el("tr", "case status-" + r[C.status] + (isOutlier(r) ? " outlier" : ""));
    tr.setAttribute("data-case", r[C.case]);
    tr.setAttribute("data-volume", r[C.volume] === null ? "" : String(r[C.volume]));
    var td = tr.appendChild(el("td", "case"));
    td.title = r[C.source] + (r[C.reused] ? " (finished by an earlier run)" : "");
    td.appendChild(done ? link(folder(r), r[C.case]) : document.createTextNode(r[C.case]));
    td = tr.appendChild(el("td", "preview"));
    if (done) {
      var a = td.appendChild(link(folder(r) + encodeURIComponent(data.files.preview), ""));
      var img = a.appendChild(el("img", "thumb"));
      img.loading = "lazy";
      img.alt = "preview of " + r[C.case];
      img.onerror = function () { img.onerror = null; img.src = folder(r) + encodeURIComponent(data.files.preview); };
      img.src = folder(r) + encodeURIComponent(data.files.thumbnail);
    }
    tr.appendChild(el("td", "num volume", r[C.volume] === null ? "" : r[C.volume].toFixed(1)));
    tr.appendChild(el("td", "num z", r[C.z] === null ? "" : r[C.z].toFixed(1)));
    tr.appendChild(el("td", "num quality" + (r[C.review] ? " review" : ""),
                      r[C.quality] === null ? "" : r[C.quality].toFixed(3)));
    tr.appendChild(el("td", "status")).appendChild(el("span", "badge status", r[C.status].replace("_", " ")));
    td = tr.appendChild(el("td", "verdict"));
    if (r[C.verdict]) { td.appendChild(el("span", "badge verdict " + r[C.verdict], r[C.verdict])); }
    td = tr.appendChild(el("td", "flags"));
    r[C.flags].forEach(function (f) { td.appendChild(el("span", "badge flag", data.flag_labels[f] || f)); });
    if (isOutlier(r)) { td.appendChild(el("span", "badge outlier", "volume outlier")); }
    tr.appendChild(el("td", "reason", r[C.error]));
    td = tr.appendChild(el("td", "files"));
    if (done) {
      data.files.links.forEach(function (l, i) {
        if (i) { td.appendChild(document.createTextNode(" \\u00b7 ")); }
        td.appendChild(link(folder(r) + encodeURIComponent(l[1]), l[0]));
      });
    }
    return tr;
  }

  function overview() {
    var counts = {ok: 0, not_found: 0, failed: 0, interrupted: 0}, outliers = 0, review = 0, flags = {}, reviewed = 0;
    data.rows.forEach(function (r) {
      counts[r[C.status]] = (counts[r[C.status]] || 0) + 1;
      if (r[C.verdict]) { reviewed += 1; }
      if (isOutlier(r)) { outliers += 1; }
      if (r[C.review]) { review += 1; }
      r[C.flags].forEach(function (f) { flags[f] = true; });
    });
    var s = data.stats, text = data.rows.length + (data.expected ? " of " + data.expected : "") + " cases: ok " +
      counts.ok + ", not found " + counts.not_found + ", failed " + counts.failed +
      (counts.interrupted ? ", interrupted " + counts.interrupted : "") + "; review suggested " + review +
      "; reviewed " + reviewed +
      "; volume outliers " + outliers;
    if (s.median_ml !== null) {
      text += " (|robust z| > " + s.outlier_z + "; median " + s.median_ml.toFixed(1) + " mL, MAD " +
        s.mad_ml.toFixed(1) + " mL over " + s.cases + " spleens)";
    }
    $("overview").textContent = text + ". Written " + data.generated + ".";
    Object.keys(flags).sort().forEach(function (f) {
      var option = el("option", "", data.flag_labels[f] || f);
      option.value = f;
      $("flag").appendChild(option);
    });
  }

  function render() {
    var s = state(), matches = [];
    data.rows.forEach(function (r, index) {
      if ((s.status && r[C.status] !== s.status) || (s.flag && r[C.flags].indexOf(s.flag) < 0) ||
          (s.verdict && r[C.verdict] !== (s.verdict === "none" ? "" : s.verdict)) ||
          (s.outliers && !isOutlier(r))) { return; }
      if (s.q && [r[C.case], r[C.source], r[C.error]].concat(r[C.flags]).join(" ").toLowerCase().indexOf(s.q) < 0) {
        return;
      }
      matches.push({row: r, index: index});
    });
    matches.sort(compare(s.sort, s.desc));
    var per = data.rows_per_page, pages = Math.max(1, Math.ceil(matches.length / per)), page = Math.min(s.page, pages);
    var fragment = document.createDocumentFragment();
    matches.slice((page - 1) * per, page * per).forEach(function (m) { fragment.appendChild(rowElement(m.row)); });
    body.replaceChildren(fragment);
    document.querySelectorAll("th[data-sort]").forEach(function (th) {
      if (th.getAttribute("data-sort") === s.sort) {
        th.setAttribute("aria-sort", s.desc ? "descending" : "ascending");
      } else { th.removeAttribute("aria-sort"); }
    });
    var first = matches.length ? (page - 1) * per + 1 : 0;
    $("showing").textContent = "showing " + first + "\\u2013" + Math.min(page * per, matches.length) + " of " +
      matches.length + " matching cases";
    $("page").textContent = "page " + page + " of " + pages;
    $("previous").disabled = page <= 1;
    $("next").disabled = page >= pages;
    $("q").value = params().get("q") || "";
    $("status").value = s.status;
    $("flag").value = s.flag;
    $("verdict").value = s.verdict;
    $("outliers").checked = s.outliers;
  }

  overview();
  var typing = null;
  $("q").addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(function () { setParam("q", $("q").value.trim()); }, 250);
  });
  $("status").addEventListener("change", function () { setParam("status", $("status").value); });
  $("flag").addEventListener("change", function () { setParam("flag", $("flag").value); });
  $("verdict").addEventListener("change", function () { setParam("verdict", $("verdict").value); });
  $("outliers").addEventListener("change", function () { setParam("outliers", $("outliers").checked ? "1" : ""); });
  $("previous").addEventListener("click", function () { setParam("page", String(state().page - 1)); });
  $("next").addEventListener("click", function () { setParam("page", String(state().page + 1)); });
  document.querySelectorAll("th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () {
      var s = state(), key = th.getAttribute("data-sort");
      setParam("sort", key === s.sort && !s.desc ? "-" + key : key);
    });
  });
  window.addEventListener("hashchange", render);
  render();
}());
</script>
</body>
</html>
"""
