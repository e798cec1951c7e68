"""The web console: server-rendered pages with inline CSS and JS (no CDN, no build step).

Pages read through the same backend as the API; buttons call the API with ``fetch`` and the
token kept in the browser's ``localStorage`` (sent as ``Authorization: Bearer``). The token is
also stored as a ``SameSite=Strict`` cookie so that pages and thumbnails load; the server
honours that cookie for reading only.
"""

from __future__ import annotations

import html
import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicom_node.admin.auth import COOKIE_NAME, Principal, find_token
from dicom_node.admin.backend import AdminBackend, AdminError, scrub_for
from dicom_node.config import NodeSettings

router = APIRouter(prefix="/console", include_in_schema=False)

_CSS = """
:root{--bg:#0f1720;--panel:#17212b;--line:#263241;--fg:#dbe4ee;--mut:#8fa1b3;--acc:#4fb3ff;
--ok:#3fb950;--warn:#d29922;--bad:#f85149}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,
sans-serif;background:var(--bg);color:var(--fg)}a{color:var(--acc);text-decoration:none}
header{display:flex;gap:18px;align-items:center;padding:10px 20px;background:var(--panel);
border-bottom:1px solid var(--line)}header b{font-size:16px}nav a{margin-right:14px}
nav a.on{color:var(--fg);border-bottom:2px solid var(--acc)}main{padding:18px 20px}
.who{margin-left:auto;color:var(--mut)}h1{font-size:18px;margin:0 0 12px}
h2{font-size:15px;margin:22px 0 8px;color:var(--mut)}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:var(--panel);
border:1px solid var(--line);border-radius:8px;padding:12px 16px;min-width:150px}
.card .v{font-size:22px;font-weight:600}.card .k{color:var(--mut);font-size:12px}
table{border-collapse:collapse;width:100%;background:var(--panel);border:1px solid var(--line)}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{color:var(--mut);font-weight:500;font-size:12px;text-transform:uppercase}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;
background:#263241}.s-done,.s-complete,.s-true{background:#1f3d2a;color:var(--ok)}
.s-failed,.s-false{background:#472024;color:var(--bad)}.s-queued,.s-receiving{background:#3a3320;
color:var(--warn)}.s-running,.s-exporting,.s-dispatching{background:#1c3350;color:var(--acc)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.tile{background:var(--panel);border:1px solid var(--line);border-radius:8px;overflow:hidden}
.tile img{width:100%;aspect-ratio:1;object-fit:contain;background:#000;display:block}
.tile div{padding:8px 10px}.mut{color:var(--mut)}
button{background:#1f6feb;color:#fff;border:0;border-radius:6px;padding:6px 12px;
cursor:pointer;font:inherit}button.sec{background:#30363d}button.bad{background:#8e1519}
button:disabled{opacity:.5}textarea{width:100%;min-height:330px;background:#0b1118;
color:var(--fg);border:1px solid var(--line);border-radius:6px;padding:10px;
font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}select,input{background:#0b1118;
color:var(--fg);border:1px solid var(--line);border-radius:6px;padding:6px}
pre{background:#0b1118;border:1px solid var(--line);border-radius:6px;padding:10px;
white-space:pre-wrap;min-height:60px}pre:empty{display:none}.row{display:flex;gap:10px;align-items:center;
flex-wrap:wrap;margin:10px 0}.two{display:grid;grid-template-columns:1fr 1fr;gap:16px}
@media(max-width:900px){.two{grid-template-columns:1fr}}
#q{flex:1;min-width:260px}.answer{background:var(--panel);border:1px solid var(--line);
border-radius:6px;padding:10px;white-space:pre-wrap}.answer:empty{display:none}
.answer.ok{border-color:var(--ok)}.answer.bad{border-color:var(--bad);color:var(--bad)}
"""

_JS = """
const TOKEN_KEY='omnimri_token';
function token(){return localStorage.getItem(TOKEN_KEY)||''}
async function api(method,path,body){
  const opt={method,headers:{'Authorization':'Bearer '+token()}};
  if(body!==undefined){opt.headers['Content-Type']='application/json';
    opt.body=JSON.stringify(body)}
  const r=await fetch(path,opt);let data=null;
  try{data=await r.json()}catch(e){data={detail:r.statusText}}
  return {ok:r.ok,status:r.status,data};
}
function show(id,res){const el=document.getElementById(id);
  el.textContent=(res.ok?'':'HTTP '+res.status+'\\n')+JSON.stringify(res.data,null,2);
  el.dataset.status=res.status;}
async function jobAction(id,action){const res=await api('POST',
  '/api/v1/jobs/'+encodeURIComponent(id)+'/'+action);show('out',res);
  if(res.ok)setTimeout(()=>location.reload(),400)}
async function testDest(name){const cell=document.getElementById('d-'+name);
  cell.textContent='testing...';const res=await api('POST',
  '/api/v1/destinations/'+encodeURIComponent(name)+'/test');
  cell.textContent=res.ok?((res.data.ok?'OK: ':'FAILED: ')+res.data.detail)
    :('HTTP '+res.status+': '+res.data.detail);
  cell.className=res.ok&&res.data.ok?'ok':'bad';cell.dataset.ok=res.ok&&res.data.ok}
function logout(){localStorage.removeItem(TOKEN_KEY);
  document.cookie=TOKEN_KEY+'=; Max-Age=0; path=/; SameSite=Strict';location='/console/login'}
"""

_PAGES = (("overview", "/console", "Overview"), ("series", "/console/series", "Series"),
          ("rules", "/console/rules", "Rules"), ("destinations", "/console/destinations",
                                                   "Destinations"))


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _page(title: str, body: str, *, active: str = "", who: Principal | None = None,
          extra_js: str = "") -> HTMLResponse:
    """One console page: header, navigation (signed-in callers only), ``body``, scripts.

    ``body`` is HTML that the caller has already escaped; the response is never cached and
    its Content-Security-Policy allows only this origin (inline styles and scripts).
    """
    nav = "".join(f'<a href="{href}" class="{"on" if key == active else ""}">{label}</a>'
                  for key, href, label in _PAGES) if who else ""
    right = (f'<span class="who">{_e(who.token_id)} ({_e(who.role)}) '
             f'<a href="#" onclick="logout()">log out</a></span>') if who else ""
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)} · OmniMRI Node</title><style>{_CSS}</style></head>
<body><header><b>OmniMRI Node</b><nav>{nav}</nav>{right}</header>
<main>{body}</main><script>{_JS}{extra_js}</script></body></html>"""
    return HTMLResponse(doc, headers={"Cache-Control": "no-store",
                                      "Content-Security-Policy": "default-src 'self'; img-src "
                                      "'self' data:; style-src 'unsafe-inline'; script-src "
                                      "'unsafe-inline'; connect-src 'self'",
                                      "X-Frame-Options": "DENY"})


def _backend(request: Request) -> AdminBackend:
    b: AdminBackend = request.app.state.backend
    return b


def _who(request: Request) -> Principal | None:
    b = _backend(request)
    presented = request.cookies.get(COOKIE_NAME, "")
    tok = find_token(b.settings.admin.tokens, presented) if presented else None
    return Principal(tok.id, tok.role) if tok else None


def _badge(state: Any) -> str:
    return f'<span class="badge s-{_e(state)}">{_e(state)}</span>'


def _to_login() -> RedirectResponse:
    return RedirectResponse("/console/login", status_code=303)


def _human_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@router.get("/login")
def login() -> HTMLResponse:
    """Ask for a token; keep it in localStorage (API calls) and a strict cookie (pages)."""
    body = """<h1>Sign in</h1><p class="mut">Paste an admin API token (from
<code>admin.tokens</code> in config.yaml).</p>
<form id="f" class="row"><input id="tok" type="password" size="40" placeholder="token"
autocomplete="off"><button>Sign in</button></form><pre id="out" hidden></pre>"""
    js = """document.getElementById('f').addEventListener('submit',async e=>{e.preventDefault();
const t=document.getElementById('tok').value.trim();localStorage.setItem(TOKEN_KEY,t);
const r=await api('GET','/api/v1/whoami');if(r.ok){document.cookie=TOKEN_KEY+'='+
encodeURIComponent(t)+'; path=/; SameSite=Strict';location='/console'}else{
const o=document.getElementById('out');o.hidden=false;o.textContent=r.data.detail}});"""
    return _page("Sign in", body, extra_js=js)


@router.get("", response_model=None)
def overview(request: Request) -> Response:
    """Node status, jobs by state and the latest jobs with retry/cancel buttons."""
    who = _who(request)
    if who is None:
        return _to_login()
    b = _backend(request)
    st = b.health.status()
    q = st["queue"]["by_state"]
    cards = [("AE title", f'{st["ae_title"]} :{st["dicom_port"]}'),
             ("associations open", st["associations"]["active"]),
             ("accepted / rejected", f'{st["associations"]["accepted"]} / '
                                     f'{st["associations"]["rejected"]}'),
             ("instances received", st["instances_received"]),
             ("queue depth", st["queue"]["depth"]),
             ("spool disk free", _human_bytes(st["disk"]["free_bytes"]))]
    card_html = "".join(f'<div class="card"><div class="v">{_e(v)}</div>'
                        f'<div class="k">{_e(k)}</div></div>' for k, v in cards)
    from dicom_node.jobs import STATES

    states = "".join(f"<td>{_badge(s)} {q.get(s, 0)}</td>" for s in STATES)
    jobs = b.jobs.recent(limit=50)
    rows = []
    for j in jobs:
        buttons = ""
        if who.is_admin:
            if j["state"] in ("failed", "cancelled"):
                buttons += f'<button onclick="jobAction({_js(j["id"])},\'retry\')">Retry</button> '
            if j["state"] not in ("done", "failed", "cancelled"):
                buttons += (f'<button class="bad" onclick="jobAction({_js(j["id"])},'
                            f'\'cancel\')">Cancel</button>')
        rows.append(
            f'<tr data-job="{_e(j["id"])}"><td class="mono">{_e(j["id"])[:12]}</td>'
            f'<td>{_badge(j["state"])}</td><td>{_e(j["pipeline"])}</td>'
            f'<td class="mono"><a href="/console/series/{quote(j["series"].split("#")[0])}">'
            f'{_e(j["series"])}</a></td><td>{_e(j["attempts"])}</td>'
            f'<td>{_e(j["updated"])}</td><td class="mut">{_e(j["last_error"] or "")[:120]}</td>'
            f"<td>{buttons}</td></tr>")
    table = ("<table id='jobs'><tr><th>job</th><th>state</th><th>pipeline</th><th>series</th>"
             "<th>attempts</th><th>updated</th><th>last error</th><th></th></tr>"
             + ("".join(rows) or "<tr><td colspan=8 class='mut'>no jobs yet</td></tr>")
             + "</table>")
    body = (f"<h1>Overview</h1><div class='cards'>{card_html}</div>"
            f"<h2>Jobs by state</h2><table id='states'><tr>{states}</tr></table>"
            f"<h2>Latest jobs</h2>{table}<pre id='out' hidden></pre>")
    return _page("Overview", body, active="overview", who=who,
                 extra_js="document.getElementById('out').hidden=false;")


def _js(v: Any) -> str:
    """A JS string literal for an HTML attribute (``onclick="f(...)"``)."""
    return _e(json.dumps(str(v)))


def _js_in_script(v: Any) -> str:
    """A JS string literal for inside a ``<script>`` element (no HTML decoding happens)."""
    return json.dumps(str(v)).replace("<", "\\u003c").replace(">", "\\u003e")


@router.get("/series", response_model=None)
def series_list(request: Request) -> Response:
    """Series as tiles with a thumbnail of the middle slice."""
    who = _who(request)
    if who is None:
        return _to_login()
    rows = scrub_for(who, _backend(request).series.recent(100))
    tiles = []
    for s in rows:
        uid = s["series_instance_uid"]
        tiles.append(
            f'<a class="tile" href="/console/series/{quote(uid)}" data-series="{_e(uid)}">'
            f'<img loading="lazy" alt="middle slice" '
            f'src="/api/v1/series/{quote(uid)}/thumbnail.png?size=192">'
            f'<div><b>{_e(s["series_description"] or "(no description)")}</b><br>'
            f'<span class="mut">{_e(s["modality"])} · {_e(s["instance_count"])} images · '
            f'{_e(s["calling_ae"])}</span><br>{_badge(s["state"])} '
            f'<span class="mut">r{_e(s["revision"])}</span></div></a>')
    body = ("<h1>Series</h1><div class='grid' id='series'>"
            + ("".join(tiles) or "<p class='mut'>no series received yet</p>") + "</div>")
    return _page("Series", body, active="series", who=who)


@router.get("/series/{series_uid}", response_model=None)
def series_detail(request: Request, series_uid: str) -> Response:
    """One series: preview, facts, jobs, and (admin) a form to run a pipeline again."""
    who = _who(request)
    if who is None:
        return _to_login()
    b = _backend(request)
    try:
        s = scrub_for(who, b.series.get(series_uid))
    except AdminError as err:
        return _page("Series", f"<h1>Series</h1><p>{_e(err)}</p>", active="series", who=who)
    facts = "".join(f"<tr><th>{_e(k)}</th><td class='mono'>{_e(s.get(k))}</td></tr>" for k in (
        "series_instance_uid", "study_instance_uid", "modality", "series_description",
        "instance_count", "expected_count", "state", "failure", "revision", "first_received_at",
        "completed_at", "calling_ae", "called_ae", "peer_host"))
    jobs = "".join(f"<tr><td class='mono'>{_e(j['id'])[:12]}</td><td>{_badge(j['state'])}</td>"
                   f"<td>{_e(j['pipeline'])}</td><td>{_e(j['destinations'])}</td>"
                   f"<td>{_e(j['attempts'])}</td></tr>" for j in s.get("jobs", []))
    rerun = ""
    if who.is_admin:
        opts = "".join(f"<option>{_e(p)}</option>" for p in sorted(b.settings.pipelines))
        rerun = (f"<h2>Run a pipeline again</h2><div class='row'><select id='pipe'>{opts}"
                 f"</select><button id='rerun'>Re-run</button></div><pre id='out'></pre>")
    js = (f"""const b=document.getElementById('rerun');if(b)b.onclick=async()=>{{
const res=await api('POST',
 '/api/v1/series/'+encodeURIComponent({_js_in_script(series_uid)})+'/rerun',
{{pipeline:document.getElementById('pipe').value}});show('out',res)}};""")
    ask_box, ask_js = _ask_box(b.settings, series_uid)
    body = (f"<h1>{_e(s.get('series_description') or 'Series')}</h1><div class='two'><div>"
            f"<img alt='middle slice' style='max-width:100%;background:#000;border-radius:8px' "
            f"src='/api/v1/series/{quote(series_uid)}/thumbnail.png?size=512'></div><div>"
            f"<table>{facts}</table></div></div><h2>Jobs</h2><table><tr><th>job</th>"
            f"<th>state</th><th>pipeline</th><th>destinations</th><th>attempts</th></tr>"
            f"{jobs or '<tr><td colspan=5 class=mut>none</td></tr>'}</table>{ask_box}{rerun}")
    return _page("Series", body, active="series", who=who, extra_js=js + ask_js)


_ASK_JS = """const af=document.getElementById('askf');if(af)af.addEventListener('submit',async e=>{
e.preventDefault();const a=document.getElementById('answer'),m=document.getElementById('askmodel'),
q=document.getElementById('q').value.trim(),p=document.getElementById('askpipe');if(!q)return;
const btn=document.getElementById('ask');btn.disabled=true;delete a.dataset.status;
a.className='answer mut';m.textContent='';
a.textContent='Reading the series... (the first question runs the model once)';
const res=await api('POST','/api/v1/series/'+encodeURIComponent(SERIES_UID)+'/ask',
  p?{question:q,pipeline:p.value}:{question:q});
if(res.ok){a.textContent=res.data.answer;a.className='answer '+(res.data.refused?'bad':'ok');
  a.dataset.refused=res.data.refused;m.textContent=(res.data.refused?'Not answered (out of '
  +'scope)':'Answered from the structured findings')+' by '+res.data.model+' ('
  +res.data.pipeline+').'}
else{const d=res.data.detail;a.textContent='HTTP '+res.status+': '+(typeof d==='string'?d
  :JSON.stringify(d));a.className='answer bad';a.dataset.refused='error'}
a.dataset.status=res.status;btn.disabled=false});"""
"""The ask box's script: the text of the answer goes in with ``textContent`` only (a model's or a
findings file's words are never parsed as HTML); ``data-status`` is set last."""


def _ask_box(settings: NodeSettings, series_uid: str) -> tuple[str, str]:
    """HTML and script of "Ask about this series" (``("", "")`` without a model pipeline).

    The box posts to ``POST /api/v1/series/{uid}/ask`` (any role; audited there, one record a
    question, without its text).
    """
    from dicom_node.admin.ask import MAX_QUESTION_CHARS, model_pipelines

    names = list(model_pipelines(settings))
    if not names:
        return ("<h2>Ask about this series</h2><p class='mut'>No pipeline with a model is "
                "configured, so there is no model to ask.</p>", "")
    pick = ("<select id='askpipe' title='model pipeline'>"
            + "".join(f"<option>{_e(n)}</option>" for n in names) + "</select>"
            if len(names) > 1 else "")
    html_ = (f"<h2>Ask about this series</h2><form id='askf' class='row'>"
             f"<input id='q' type='text' maxlength='{MAX_QUESTION_CHARS}' autocomplete='off' "
             f"aria-label='Ask about this series' placeholder='e.g. how many white matter "
             f"lesions are there? which side is the largest lesion on? what is the brain "
             f"volume?'>{pick}<button id='ask'>Ask</button></form>"
             f"<div id='answer' class='answer' aria-live='polite'></div>"
             f"<p id='askmodel' class='mut'></p>")
    return html_, f"const SERIES_UID={_js_in_script(series_uid)};" + _ASK_JS


@router.get("/rules", response_model=None)
def rules_editor(request: Request) -> Response:
    """The rule editor: YAML text, validate, live test against a stored series, apply."""
    who = _who(request)
    if who is None:
        return _to_login()
    b = _backend(request)
    cur = b.rules.current()
    series = b.series.recent(200)
    opts = "".join(
        f'<option value="{_e(s["series_instance_uid"])}">'
        f'{_e(s["series_description"] or s["series_instance_uid"])} ({_e(s["modality"])}, '
        f'{_e(s["instance_count"])})</option>'
        for s in series if s["state"] == "complete")
    apply_btn = "<button class='bad' id='apply'>Apply</button>" if who.is_admin else ""
    body = f"""<h1>Routing rules</h1><div class="two"><div>
<textarea id="draft" spellcheck="false">{_e(cur["yaml"])}</textarea>
<div class="row"><button class="sec" id="validate">Validate</button>{apply_btn}
<span class="mut">pipelines: {_e(", ".join(cur["pipelines"]) or "-")} · destinations:
{_e(", ".join(cur["destinations"]) or "-")}, sender</span></div></div><div>
<div class="row"><select id="series">{opts or '<option value="">(no complete series)</option>'}
</select><button id="test">Test against series</button></div>
<div class="row"><input type="file" id="file"><button class="sec" id="testfile">Test file
</button></div><pre id="out"></pre></div></div>"""
    js = """const $=id=>document.getElementById(id);
function draft(){return {yaml:$('draft').value}}
function explain(res){const o=$('out');o.dataset.status=res.status;
  if(res.ok&&res.data.text!==undefined){o.textContent=res.data.text}
  else if(res.ok){o.textContent=JSON.stringify(res.data,null,2)}
  else{o.textContent='HTTP '+res.status+': '+res.data.detail+'\\n'+(res.data.problems||[])
    .map(p=>p.key+': '+p.reason).join('\\n')}}
$('validate').onclick=async()=>explain(await api('POST','/api/v1/rules/validate',draft()));
$('test').onclick=async()=>explain(await api('POST','/api/v1/rules/test',
  Object.assign(draft(),{series_uid:$('series').value})));
$('testfile').onclick=async()=>{const f=$('file').files[0];if(!f)return;
  const buf=new Uint8Array(await f.arrayBuffer());let s='';
  for(let i=0;i<buf.length;i+=32768)s+=String.fromCharCode.apply(null,buf.subarray(i,i+32768));
  explain(await api('POST','/api/v1/rules/test',Object.assign(draft(),{dicom_base64:btoa(s)})))};
const ap=$('apply');if(ap)ap.onclick=async()=>{if(!confirm('Apply these rules now?'))return;
  explain(await api('PUT','/api/v1/rules',draft()))};"""
    return _page("Rules", body, active="rules", who=who, extra_js=js)


@router.get("/destinations", response_model=None)
def destinations(request: Request) -> Response:
    """Destinations with a Test button each (admin)."""
    who = _who(request)
    if who is None:
        return _to_login()
    rows = []
    for d in _backend(request).destinations.configured():
        btn = (f'<button onclick="testDest({_js(d["name"])})">Test</button>'
               if who.is_admin else "")
        rows.append(f"<tr><td><b>{_e(d['name'])}</b></td><td>{_e(d['kind'])}</td>"
                    f"<td class='mono'>{_e(d.get('target'))}</td><td>{btn}</td>"
                    f"<td id='d-{_e(d['name'])}' class='mut'></td></tr>")
    body = ("<h1>Destinations</h1><table id='dests'><tr><th>name</th><th>kind</th>"
            "<th>target</th><th></th><th>result</th></tr>"
            + ("".join(rows) or "<tr><td colspan=5 class=mut>none configured</td></tr>")
            + "</table>")
    return _page("Destinations", body, active="destinations", who=who)
