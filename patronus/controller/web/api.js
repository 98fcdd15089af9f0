// The controller's API as the page uses it: the session (tokens in memory,
// refreshed before they expire), REST with problem details, GraphQL over
// HTTP, and subscriptions over graphql-transport-ws.

const PREFIX = "/api/v1";
const GQL = "/api/graphql";

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.field = this.problem.field || null;
  }
}

export class Session {
  constructor() {
    this.access = null;     // in memory only: never localStorage
    this.refreshToken = null;
    this.timer = null;
    this.onchange = () => {};
    this.onexpired = () => {};
  }

  get loggedIn() { return this.access !== null; }

  async login(name, password, totp) {
    const body = { name, password };
    if (totp) body.totp = totp;
    const pair = await rawJson("POST", `${PREFIX}/auth/login`, body);
    this._take(pair);
  }

  _take(pair) {
    this.access = pair.access_token;
    this.refreshToken = pair.refresh_token;
    clearTimeout(this.timer);
    // refresh at 80 % of the lifetime (at least 5 s ahead)
    const life = Math.max(10, Number(pair.expires_in) || 900);
    const ms = Math.max(5, Math.min(life * 0.8, life - 5)) * 1000;
    this.timer = setTimeout(() => this.refresh().catch(() => this.onexpired()), ms);
    this.onchange();
  }

  async refresh() {
    if (!this.refreshToken) throw new ApiError(401, { detail: "not logged in" });
    const pair = await rawJson("POST", `${PREFIX}/auth/refresh`, { refresh_token: this.refreshToken });
    this._take(pair);
  }

  async logout() {
    const body = this.refreshToken ? { refresh_token: this.refreshToken } : undefined;
    try { if (this.access) await this.rest("POST", "/auth/logout", body); } catch (e) { /* gone already */ }
    this.clear();
  }

  clear() {
    clearTimeout(this.timer);
    this.access = this.refreshToken = null;
  }

  // REST under /api/v1; retries once after a refresh when the token expired.
  async rest(method, path, body, headers = {}) {
    const go = () => rawJson(method, PREFIX + path, body, { ...headers, Authorization: `Bearer ${this.access}` }, true);
    try {
      return await go();
    } catch (e) {
      if (e.status === 401 && this.refreshToken) {
        await this.refresh();
        return go();
      }
      throw e;
    }
  }

  async graphql(query, variables = {}) {
    const go = () => rawJson("POST", GQL, { query, variables }, { Authorization: `Bearer ${this.access}` });
    let out;
    try {
      out = await go();
    } catch (e) {
      if (e.status === 401 && this.refreshToken) {
        await this.refresh();
        out = await go();
      } else {
        throw e;
      }
    }
    return out;   // {data, errors}
  }
}

async function rawJson(method, url, body, headers = {}, withEtag = false) {
  const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(url, init);
  const text = r.status === 204 ? "" : await r.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (e) { data = { detail: text }; }
  }
  if (!r.ok) throw new ApiError(r.status, data);
  if (withEtag && data && typeof data === "object" && !Array.isArray(data)) {
    const etag = r.headers.get("ETag");
    if (etag) Object.defineProperty(data, "_etag", { value: etag, enumerable: false });
  }
  return data;
}

// graphql-transport-ws: one socket, several subscriptions; reconnects with
// the session's current token (a refreshed token replaces an expiring one).
export class Live {
  constructor(session) {
    this.session = session;
    this.subs = new Map();   // id -> {query, variables, onnext}
    this.ws = null;
    this.ready = false;
    this.stopped = true;
    this.retry = 500;
    this.onstate = () => {};
    this.nextId = 1;
  }

  subscribe(query, variables, onnext) {
    const id = String(this.nextId++);
    this.subs.set(id, { query, variables, onnext });
    if (this.ready) this._send(id);
    return id;
  }

  start() {
    this.stopped = false;
    this._connect();
  }

  stop() {
    this.stopped = true;
    this.ready = false;
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
    this.subs.clear();
    this.onstate("offline");
  }

  // a new token: a new socket (the server ends a socket whose token expires)
  renew() {
    if (this.stopped) return;
    const old = this.ws;
    this.ws = null;
    this.ready = false;
    if (old) { old.onclose = null; old.close(1000, "token renewed"); }
    this._connect();
  }

  _connect() {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + GQL;
    const ws = new WebSocket(url, "graphql-transport-ws");
    this.ws = ws;
    this.onstate("connecting");
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "connection_init", payload: { authorization: `Bearer ${this.session.access}` } }));
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "connection_ack") {
        this.ready = true;
        this.retry = 500;
        this.onstate("live");
        for (const id of this.subs.keys()) this._send(id);
      } else if (msg.type === "next") {
        const s = this.subs.get(msg.id);
        if (s && msg.payload && msg.payload.data) s.onnext(msg.payload.data);
      } else if (msg.type === "ping") {
        ws.send(JSON.stringify({ type: "pong" }));
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ready = false;
      this.ws = null;
      if (this.stopped) return;
      this.onstate("offline");
      const again = () => { if (!this.stopped && !this.ws) this._connect(); };
      if (ev.code === 4401 && this.session.refreshToken) {
        this.session.refresh().then(again, () => this.session.onexpired());
      } else {
        setTimeout(again, this.retry);
        this.retry = Math.min(this.retry * 2, 10000);
      }
    };
  }

  _send(id) {
    const s = this.subs.get(id);
    this.ws.send(JSON.stringify({ id, type: "subscribe", payload: { query: s.query, variables: s.variables || {} } }));
  }
}
