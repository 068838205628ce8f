// selchat web client: one WebSocket to /ws, one JSON object of the native protocol per
// text message. No framework and no build step, so the page is exactly what the server ships.
//
// Safety rule for this file: everything that came from the server (texts, nicks, room names,
// reasons, the motd) reaches the page only as text nodes (textContent / append(string)) or as
// an href that passed the http/https check in linkify(). Nothing is ever assigned to innerHTML.

"use strict";

(() => {
  const LOBBY = "#lobby";
  const HISTORY_PAGE = 50;
  const LIVENESS_EVERY_MS = 30000; // our own ping, to notice a server that vanished silently
  const LIVENESS_WAIT_MS = 15000;
  const INPUT_HISTORY_MAX = 100;
  const NOTIFY_KEY = "selchat.notify";
  const NICK_KEY = "selchat.nick";
  const SESSION_KEY = "selchat.session"; // per tab: what a reload puts back
  const LOGIN_KEY = "selchat.login"; // {account, token}: localStorage, or sessionStorage
  const NICK_MAX = 32;
  const NICK_CHAR = /^[A-Za-z0-9_\-[\]{}\\|^]$/;

  const COMMANDS = [
    ["/join #room [key]", "join a room and show it (with its key, if it has one)"],
    ["/part [#room]", "leave the current room (or the one named)"],
    ["/query nick", "open a private conversation with nick"],
    ["/msg nick text", "send a private message"],
    ["/me text", "say an action: * you text"],
    ["/nick newnick", "change your nickname"],
    ["/who [#room]", "list the members of the current room"],
    ["/rooms", "list every room with its member count"],
    ["/history [n]", "load up to n older messages"],
    ["/close", "close this conversation (or leave this room)"],
    ["/topic [text]", "show the room's topic, or set it"],
    ["/invite nick [#room]", "invite someone to this room"],
    ["/kick nick [reason]", "put someone out of this room (operators)"],
    ["/ban mask", "ban a nick, account:NAME or nick!user@host (operators)"],
    ["/unban mask", "lift a ban (operators)"],
    ["/op nick", "make someone an operator of this room (operators)"],
    ["/deop nick", "take operator away (operators)"],
    ["/voice nick", "let someone speak in a moderated room (operators)"],
    ["/devoice nick", "take voice away (operators)"],
    ["/mode", "the room's settings"],
    ["/register password", "make your nick an account"],
    ["/login account password", "log in to your account"],
    ["/logout", "log out on this device and leave the chat"],
    ["/quit [reason]", "leave the chat"],
    ["/help", "this list"],
  ];
  const KEYS = [
    ["Enter", "send"],
    ["Tab", "complete a nick, room or command"],
    ["Up / Down", "recall what you typed"],
    ["Alt+Up / Alt+Down", "previous / next room or conversation"],
    ["Alt+A", "next room or conversation with activity (mentions first)"],
    ["PageUp / PageDown", "scroll the messages"],
  ];

  // ----- small helpers ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  /** Untrusted value as display text: never throws, never returns markup. */
  const str = (v) => (typeof v === "string" ? v : v === undefined || v === null ? "" : String(v));
  /** The server compares nicks and rooms case-insensitively (ASCII); so must we. */
  const fold = (s) => str(s).replace(/[A-Z]/g, (c) => c.toLowerCase());
  const isInt = (v) => typeof v === "number" && Number.isInteger(v);
  const normalizeRoom = (name) => (name.startsWith("#") ? name : "#" + name);
  const pad2 = (n) => (n < 10 ? "0" : "") + n;

  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();

  const PALETTE = 32; // colour slots .c0 .. .c31 in style.css

  /** CRC-32 of the folded nick (the terminal client's hash): a nick's own colour slot. */
  const hashes = new Map(); // folded nick -> CRC-32, for the member lists of big rooms
  const encoder = new TextEncoder();
  function nickHash(nick) {
    const key = fold(nick);
    let h = hashes.get(key);
    if (h !== undefined) return h;
    let c = 0xffffffff;
    for (const b of encoder.encode(key)) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
    h = (c ^ 0xffffffff) >>> 0;
    if (hashes.size >= 10000) hashes.clear();
    hashes.set(key, h);
    return h;
  }

  // The hues of the colour slots (style.css .c0 .. .c31: slot i has hue HUES[i % 16], in a
  // lighter tone below 16 and a darker one from 16; the dark theme swaps the lightness).
  const HUES = [0, 25, 45, 62, 90, 120, 150, 175, 195, 215, 235, 258, 280, 300, 320, 340];

  /** How far apart two colour slots look: the hue angle between them, plus 30 across tones. */
  function slotDistance(a, b) {
    const d = Math.abs(HUES[a % 16] - HUES[b % 16]);
    return Math.min(d, 360 - d) + ((a < 16) !== (b < 16) ? 30 : 0);
  }

  /** Colours for the members of a room that no two of them share while there are fewer than
   * PALETTE, and that stay far apart while there are few: the members, in folded-name order,
   * each take the first slot from their own (nickHash mod PALETTE, onwards) that is at least
   * 60 from every slot taken, else 40, else 20, else any free one. A function of the member
   * list alone, so every device in the room shows the same colours. */
  function assignColours(nicks) {
    const keys = Array.from(new Set(nicks.map(fold))).sort();
    const taken = new Set(); // slots, at most PALETTE: the work per member is bounded
    const out = new Map();
    for (const key of keys) {
      const base = nickHash(key) % PALETTE;
      let slot = base;
      if (taken.size < PALETTE) {
        pick: for (const far of [60, 40, 20, 1]) {
          for (let k = 0; k < PALETTE; k++) {
            const s = (base + k) % PALETTE;
            if (taken.has(s)) continue;
            let ok = true;
            for (const t of taken) {
              if (slotDistance(s, t) < far) {
                ok = false;
                break;
              }
            }
            if (ok) {
              slot = s;
              break pick;
            }
          }
        }
      }
      taken.add(slot);
      out.set(key, slot);
    }
    return out;
  }

  /** What is wrong with a nick, in words, and a valid one to suggest; null when it is fine.
   * The rule is the server's (protocol.md, "Names"): 1..32 of A-Z a-z 0-9 _ - [ ] { } \ | ^,
   * not starting with a digit or '-'. */
  function nickProblem(nick) {
    if (!nick) return { why: "Choose a nickname.", suggestion: "" };
    const chars = Array.from(nick);
    const whys = [];
    if (/\s/.test(nick)) whys.push("cannot contain spaces");
    const bad = Array.from(new Set(chars.filter((c) => !/\s/.test(c) && !NICK_CHAR.test(c))));
    if (bad.length) {
      const shown = bad.slice(0, 4).map((c) => `\u201c${c}\u201d`).join(" ");
      whys.push(`cannot contain ${shown}` + (bad.length > 4 ? " and others" : "") + " (only letters A-Z, digits and _ - [ ] { } \\ | ^)");
    }
    if (/^[0-9-]/.test(nick)) whys.push("cannot start with a digit or \u2018-\u2019");
    if (chars.length > NICK_MAX) whys.push(`is at most ${NICK_MAX} characters (this one has ${chars.length})`);
    if (!whys.length) return null;
    const last = whys.pop();
    const why = "A nickname " + (whys.length ? whys.join(", ") + " and " : "") + last + ".";
    return { why, suggestion: suggestNick(nick) };
  }

  /** The nearest valid nick: spaces become _, accents are dropped from their letters, other
   * characters go, no digit or '-' first, at most 32. "" when nothing is left. */
  function suggestNick(nick) {
    let s = nick.trim().replace(/\s+/g, "_");
    s = s.normalize("NFKD").replace(/[\u0300-\u036f]/g, "");
    s = Array.from(s).filter((c) => NICK_CHAR.test(c)).join("");
    s = s.replace(/^-+/, "");
    if (/^[0-9]/.test(s)) s = "_" + s;
    return s.slice(0, NICK_MAX);
  }

  const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

  /** Append `text` to `parent` as text nodes, with http(s) URLs as safe links. */
  function linkify(parent, text) {
    let last = 0;
    for (const m of text.matchAll(URL_RE)) {
      let url = m[0];
      // Punctuation that ends a sentence is not part of the link; a ")" is, when balanced.
      while (/[.,;:!?'")\]}>]$/.test(url)) {
        if (url.endsWith(")") && (url.match(/\(/g) || []).length >= (url.match(/\)/g) || []).length) break;
        url = url.slice(0, -1);
      }
      let href = null;
      try {
        const u = new URL(url);
        if (u.protocol === "http:" || u.protocol === "https:") href = u.href;
      } catch (e) {
        href = null;
      }
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (href) {
        const a = el("a", null, url);
        a.href = href;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        parent.append(a);
      } else {
        parent.append(url);
      }
      last = m.index + url.length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  /** The local calendar day of a time, as a key ("2026-12-07") that sorts and compares. */
  function dayKey(ms) {
    const d = new Date(ms);
    return d.getFullYear() + "-" + pad2(d.getMonth() + 1) + "-" + pad2(d.getDate());
  }

  function dayLabel(ms) {
    return new Date(ms).toLocaleDateString(undefined, { weekday: "long", year: "numeric", month: "long", day: "numeric" });
  }

  function timeCell(ms) {
    const d = new Date(ms);
    const cell = el("time", "time", pad2(d.getHours()) + ":" + pad2(d.getMinutes()));
    cell.dateTime = d.toISOString();
    cell.title = d.toLocaleString(undefined, {
      weekday: "long", year: "numeric", month: "long", day: "numeric",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
    return cell;
  }

  /** A line's time: its cell and the day it belongs to (for the day separators). */
  function stamp(line, ms) {
    line.dataset.day = dayKey(ms);
    line.dataset.ms = String(ms);
    return timeCell(ms);
  }

  /** The colour class of a nick in a view: its slot among the room's members, else its own. */
  function colourOf(view, nick) {
    const key = fold(nick);
    let slot = view ? view.colours.get(key) : undefined;
    if (slot === undefined && view) slot = view.pastColours.get(key);
    if (slot === undefined) slot = nickHash(key) % PALETTE;
    return "c" + slot;
  }

  function nickSpan(nick, view) {
    const s = el("span", "nick nc " + colourOf(view, nick), nick);
    s.dataset.nick = nick;
    s.dataset.key = fold(nick);
    return s;
  }

  // ----- state -----------------------------------------------------------------------------

  const S = {
    ws: null,
    nick: "", // the nick we are (or want to be)
    password: null,
    registered: false,
    everRegistered: false,
    quitting: false,
    views: new Map(), // key (folded room or nick) -> view
    current: null, // key of the view shown
    refs: 1,
    pending: new Map(), // ref -> the request it answers
    helloRef: null,
    rejoin: null, // rooms to join again after a reconnect
    lobbyWanted: true,
    delays: null,
    retryTimer: null,
    retryAt: 0,
    countdown: null,
    livenessTimer: null,
    livenessDeadline: null,
    livenessToken: null,
    pace: { rate: 0, burst: 1, tokens: 1, stamp: 0, queue: [], timer: null },
    roomsAcc: [],
    inputHistory: [],
    inputPos: -1,
    completion: null,
    notify: false,
    motdShown: false,
    welcome: null, // the last welcome, for the greeting line
    restoring: false, // signing in again after a reload
    account: null, // the account this page is logged into
    token: null, // its remember token (the password is never kept)
    tokenRemember: false, // kept in localStorage (this device) or sessionStorage (this tab)
    loginMode: "guest", // the form's tab: guest, login, register
    pendingLogin: null, // {account, password}: the form's login, for the next hello only
    registerPassword: null, // the form's register: sent once the hello is welcomed
    remember: true,
    quitMessage: "",
    restoreTries: 0,
  };

  const ui = {};

  // ----- views (rooms and private conversations) -------------------------------------------

  function makeView(kind, name) {
    const key = fold(name);
    const log = el("div", "log");
    log.dataset.view = key;
    log.setAttribute("role", "log");
    log.setAttribute("aria-label", name);
    log.tabIndex = -1;
    const li = el("li");
    const button = el("button", "view-item");
    button.type = "button";
    button.dataset.view = key;
    const label = el("span", "view-name", name);
    const badge = el("span", "badge");
    button.append(label, badge);
    li.append(button);
    const view = {
      key, kind, name, log, li, button, label, badge,
      joined: false, unread: 0, mention: false,
      members: new Map(), ops: new Set(), voiced: new Set(), accounts: new Map(), namesAcc: null,
      colours: new Map(), pastColours: new Map(), topic: null, modes: null, bans: [],
      seen: new Set(), oldestId: null, lastId: 0, more: false, loadingOlder: false,
      startShown: false, stick: true, scrollTop: 0, joining: false, announced: false, below: 0,
    };
    button.addEventListener("click", () => {
      switchTo(key);
      closeDrawers();
      ui.input.focus();
    });
    log.addEventListener("scroll", () => onLogScroll(view));
    ui.logs.append(log);
    (kind === "room" ? ui.roomList : ui.queryList).append(li);
    sortList(kind === "room" ? ui.roomList : ui.queryList);
    S.views.set(key, view);
    return view;
  }

  function sortList(list) {
    const items = Array.from(list.children);
    items.sort((a, b) => {
      const ka = a.firstChild.dataset.view;
      const kb = b.firstChild.dataset.view;
      if (ka === LOBBY) return -1;
      if (kb === LOBBY) return 1;
      return ka < kb ? -1 : ka > kb ? 1 : 0;
    });
    for (const li of items) list.append(li);
  }

  function roomView(name, create) {
    const key = fold(name);
    let v = S.views.get(key);
    if (!v && create) v = makeView("room", name);
    return v || null;
  }

  function queryView(nick, create) {
    const key = fold(nick);
    let v = S.views.get(key);
    if (!v && create) v = makeView("query", nick);
    return v || null;
  }

  function rename(view, name) {
    view.name = name;
    view.label.textContent = name;
    view.log.setAttribute("aria-label", name);
    if (S.current === view.key) renderHeader();
  }

  function rekey(view, newName) {
    S.views.delete(view.key);
    const wasCurrent = S.current === view.key;
    view.key = fold(newName);
    if (wasCurrent) S.current = view.key;
    view.log.dataset.view = view.key;
    view.button.dataset.view = view.key;
    S.views.set(view.key, view);
    rename(view, newName);
    sortList(view.kind === "room" ? ui.roomList : ui.queryList);
  }

  function removeView(view) {
    const order = viewOrder();
    const idx = order.indexOf(view.key);
    view.log.remove();
    view.li.remove();
    S.views.delete(view.key);
    if (S.current === view.key) {
      const rest = viewOrder();
      S.current = null;
      if (rest.length) switchTo(rest[Math.max(0, Math.min(idx, rest.length) - 1)] || rest[0]);
      else renderHeader();
    }
    updateTitle();
  }

  /** Views in sidebar order: rooms, then conversations. */
  function viewOrder() {
    const keys = [];
    for (const list of [ui.roomList, ui.queryList]) {
      for (const li of list.children) keys.push(li.firstChild.dataset.view);
    }
    return keys;
  }

  function currentView() {
    return S.current ? S.views.get(S.current) || null : null;
  }

  function switchTo(key) {
    const view = S.views.get(key);
    if (!view) return;
    const old = currentView();
    if (old && old !== view) {
      old.scrollTop = old.log.scrollTop;
      old.log.classList.remove("active");
      old.button.classList.remove("current");
      old.button.removeAttribute("aria-current");
    }
    S.current = key;
    closeMemberMenu();
    if (!ui.topicForm.hidden) {
      ui.topicForm.hidden = true;
      ui.topicText.hidden = false;
    }
    view.log.classList.add("active");
    view.button.classList.add("current");
    view.button.setAttribute("aria-current", "page");
    if (view.stick) scrollToBottom(view);
    else view.log.scrollTop = view.scrollTop;
    markRead(view);
    renderHeader();
    renderMembers();
    renderJump();
    maybeFill(view);
  }

  function markRead(view) {
    view.unread = 0;
    view.mention = false;
    renderBadge(view);
    updateTitle();
  }

  function renderBadge(view) {
    view.badge.textContent = view.unread ? String(view.unread) : "";
    view.button.classList.toggle("unread", view.unread > 0);
    view.button.classList.toggle("mention", view.mention);
    view.button.classList.toggle("parted", view.kind === "room" && !view.joined && S.registered);
    view.button.title = view.unread ? `${view.name}: ${view.unread} unread` : view.name;
  }

  function updateTitle() {
    let total = 0;
    let mention = false;
    for (const v of S.views.values()) {
      total += v.unread;
      mention = mention || v.mention;
    }
    const cur = currentView();
    const base = (cur ? cur.name + " - " : "") + "selchat";
    // On a phone the sidebar is hidden: its button shows that something happened elsewhere.
    let elsewhere = false;
    let elsewhereMention = false;
    for (const v of S.views.values()) {
      if (v.key !== S.current && v.unread) {
        elsewhere = true;
        elsewhereMention = elsewhereMention || v.mention;
      }
    }
    ui.sidebarToggle.classList.toggle("activity", elsewhere);
    ui.sidebarToggle.classList.toggle("mention", elsewhereMention);
    document.title = (total ? `(${total}${mention ? "!" : ""}) ` : "") + base;
  }

  function renderHeader() {
    const view = currentView();
    ui.title.textContent = view ? view.name : "selchat";
    if (!view) ui.info.textContent = "";
    else if (view.kind === "query") ui.info.textContent = "private conversation";
    else if (!view.joined) ui.info.textContent = S.registered ? "not joined" : "";
    else ui.info.textContent = view.members.size === 1 ? "1 member" : `${view.members.size} members`;
    ui.app.classList.toggle("no-members", !view || view.kind !== "room");
    renderTopic();
    updateTitle();
  }

  /** Operators first, then voiced members, then the others; by name within each. */
  function memberRank(view, key) {
    return view.ops.has(key) ? 0 : view.voiced.has(key) ? 1 : 2;
  }

  function renderMembers() {
    const view = currentView();
    if (!view || view.kind !== "room") return;
    const nicks = Array.from(view.members.values());
    nicks.sort((a, b) => {
      const fa = fold(a);
      const fb = fold(b);
      const ra = memberRank(view, fa);
      const rb = memberRank(view, fb);
      if (ra !== rb) return ra - rb;
      return fa < fb ? -1 : fa > fb ? 1 : 0;
    });
    const items = nicks.map((nick) => {
      const key = fold(nick);
      const li = el("li");
      li.dataset.nick = nick;
      li.tabIndex = 0;
      li.setAttribute("role", "button");
      const account = view.accounts.get(key);
      const role = view.ops.has(key) ? "operator" : view.voiced.has(key) ? "voiced" : "";
      li.title = [nick, role, account ? `account ${account}` : ""].filter(Boolean).join(", ");
      if (view.ops.has(key)) {
        li.classList.add("op");
        li.append(el("span", "op-mark", "@"));
      } else if (view.voiced.has(key)) {
        li.classList.add("voiced");
        li.append(el("span", "voice-mark", "+"));
      }
      if (account) li.classList.add("has-account");
      li.append(el("span", "nc " + colourOf(view, nick), nick));
      return li;
    });
    ui.memberList.replaceChildren(...items);
    ui.memberCount.textContent = `(${nicks.length})`;
    if (S.current === view.key) {
      ui.info.textContent = nicks.length === 1 ? "1 member" : `${nicks.length} members`;
    }
  }

  function forgetMember(view, nick) {
    const key = fold(nick);
    view.members.delete(key);
    view.ops.delete(key);
    view.voiced.delete(key);
    view.accounts.delete(key);
    recolour(view);
  }

  /** After the members changed: give them colours no two share, and repaint the nicks (in
   * the log too) whose colour moved. Who left keeps the colour they had. */
  function recolour(view) {
    if (view.kind !== "room") return;
    const old = view.colours;
    const next = assignColours(Array.from(view.members.values()));
    for (const [key, slot] of old) {
      if (!next.has(key)) {
        view.pastColours.delete(key);
        view.pastColours.set(key, slot);
        if (view.pastColours.size > 500) view.pastColours.delete(view.pastColours.keys().next().value);
      }
    }
    const changed = [];
    for (const [key, slot] of next) {
      const before = old.has(key) ? old.get(key) : view.pastColours.has(key) ? view.pastColours.get(key) : nickHash(key) % PALETTE;
      view.pastColours.delete(key);
      if (before !== slot) changed.push(key);
    }
    view.colours = next;
    for (const key of changed) {
      const cls = colourOf(view, key);
      for (const span of view.log.querySelectorAll(`.nc[data-key="${CSS.escape(key)}"]`)) {
        span.className = span.className.replace(/\bc\d+\b/, cls);
      }
    }
    if (S.current === view.key) renderMembers();
  }

  // ----- lines -----------------------------------------------------------------------------

  function nearBottom(log) {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  }

  function scrollToBottom(view) {
    view.log.scrollTop = view.log.scrollHeight;
  }

  /** While you read further up, new lines do not move the page; a button says they came. */
  function renderJump() {
    const view = currentView();
    const n = view && !view.stick ? view.below : 0;
    ui.jump.hidden = !n;
    ui.jump.textContent = n === 1 ? "1 new message \u2193" : `${n} new messages \u2193`;
  }

  function onLogScroll(view) {
    view.stick = nearBottom(view.log);
    if (view.stick && view.below) {
      view.below = 0;
      if (S.current === view.key) renderJump();
    }
    if (view.log.scrollTop < 80) loadOlder(view, HISTORY_PAGE);
  }

  /** Add a line at the end of a view, following the bottom if the reader was there. */
  function appendLine(view, line) {
    const stick = view.stick || nearBottom(view.log);
    const day = line.dataset.day;
    if (day) {
      const prev = lastDay(view);
      if (day !== prev && (prev !== null || day !== dayKey(Date.now()))) view.log.append(dayDivider(line));
    }
    view.log.append(line);
    if (stick) {
      scrollToBottom(view);
      view.stick = true;
    } else if (line.classList.contains("msg")) {
      view.below += 1;
      if (S.current === view.key) renderJump();
    }
  }

  /** The day of the last dated line of a view, or null. */
  function lastDay(view) {
    for (let n = view.log.lastElementChild; n; n = n.previousElementSibling) {
      if (n.dataset.day) return n.dataset.day;
    }
    return null;
  }

  function dayDivider(line) {
    const d = divider(dayLabel(Number(line.dataset.ms)), "day");
    d.dataset.when = line.dataset.day;
    return d;
  }

  /** Day separators again after lines went in anywhere but at the end (history pages, lines
   * placed by id): one before each line whose day is not the previous line's, and one at the
   * top when the first line is not from today. */
  function fixDays(view) {
    for (const d of view.log.querySelectorAll(".divider.day")) d.remove();
    const today = dayKey(Date.now());
    let prev = null;
    for (const node of Array.from(view.log.children)) {
      const day = node.dataset.day;
      if (!day) continue;
      if (day !== prev && (prev !== null || day !== today)) node.before(dayDivider(node));
      prev = day;
    }
  }

  function systemLine(view, ms, parts, cls) {
    const line = el("div", "line " + (cls || "system"));
    const body = el("span", "body");
    body.append(...parts); // strings become text nodes
    line.append(stamp(line, ms), body);
    appendLine(view, line);
    return line;
  }

  /** A local note (help, hints, connection news) in the current view, or nowhere yet. */
  function note(text, cls) {
    const view = currentView();
    if (!view) return null;
    const line = el("div", "line " + (cls || "info"));
    line.append(stamp(line, Date.now()), el("span", "text", text));
    appendLine(view, line);
    return line;
  }

  function divider(text, cls) {
    return el("div", "divider" + (cls ? " " + cls : ""), text);
  }

  function mentions(text) {
    if (!S.nick) return false;
    const esc = S.nick.replace(/[.*+?^${}()|[\]\\-]/g, "\\$&");
    const edge = "[A-Za-z0-9_\\-\\[\\]{}\\\\|^]";
    return new RegExp(`(^|[^A-Za-z0-9_\\-\\[\\]{}\\\\|^])${esc}(?!${edge})`, "i").test(text);
  }

  function isMe(nick) {
    return typeof nick === "string" && S.nick !== "" && fold(nick) === fold(S.nick);
  }

  function messageLine(m, earlier, view) {
    const from = str(m.from);
    const text = str(m.text);
    const ms = isInt(m.ts) ? m.ts : Date.now();
    const line = el("div", "line msg");
    if (isInt(m.id)) line.dataset.id = String(m.id);
    line.dataset.from = from;
    if (m.action === true) line.classList.add("action");
    if (m.notice === true) line.classList.add("notice-msg");
    if (earlier) line.classList.add("earlier");
    if (isMe(from)) line.classList.add("own");
    else if (mentions(text)) line.classList.add("highlight");
    const body = el("span", "body");
    if (m.action === true) {
      body.append("* ", nickSpan(from, view), " ");
    } else {
      body.append(nickSpan(from, view));
    }
    const t = el("span", "text");
    linkify(t, text);
    body.append(t);
    line.append(stamp(line, ms), body);
    return line;
  }

  /** The view a message belongs to: its room, or the conversation with the other party. */
  function viewForMessage(m) {
    if (typeof m.room === "string") return roomView(m.room, false);
    const peer = isMe(m.from) ? str(m.to) : str(m.from);
    if (!peer) return null;
    return queryView(peer, true);
  }

  function firstMessage(view) {
    return view.log.querySelector(".line.msg[data-id]");
  }

  /** Put a message line where its id says, so history and live lines interleave correctly. */
  function placeById(view, line, id) {
    if (id > view.lastId) {
      appendLine(view, line);
      view.lastId = id;
      return;
    }
    const lines = view.log.querySelectorAll(".line.msg[data-id]");
    for (let i = lines.length - 1; i >= 0; i--) {
      if (Number(lines[i].dataset.id) < id) {
        lines[i].after(line);
        fixDays(view);
        return;
      }
    }
    const first = lines[0];
    if (first) {
      first.before(line);
      fixDays(view);
    } else appendLine(view, line);
  }

  /** Record a message id in a view; false if the view already shows it. */
  function remember(view, m) {
    if (!isInt(m.id)) return true;
    if (view.seen.has(m.id)) return false;
    view.seen.add(m.id);
    if (view.oldestId === null || m.id < view.oldestId) view.oldestId = m.id;
    return true;
  }

  function countUnread(view, m) {
    if (isMe(m.from)) return;
    const mention = view.kind === "query" || mentions(str(m.text));
    const away = document.hidden || !document.hasFocus();
    if (S.current !== view.key || document.hidden) {
      view.unread += 1;
      if (mention) view.mention = true;
      renderBadge(view);
      updateTitle();
    }
    if (mention && (away || S.current !== view.key)) notifyAbout(view, m);
  }

  // ----- connection ------------------------------------------------------------------------

  function wsUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  }

  function setConn(state, text) {
    ui.conn.dataset.state = state;
    ui.conn.textContent = text;
    ui.loginState.textContent = S.everRegistered ? "" : state === "online" ? "" : text;
  }

  function connect() {
    clearTimeout(S.retryTimer);
    clearInterval(S.countdown);
    S.retryTimer = null;
    const ws = new WebSocket(wsUrl());
    S.ws = ws;
    setConn("connecting", S.everRegistered ? "reconnecting..." : "connecting...");
    ws.addEventListener("open", () => {
      if (S.ws !== ws) return;
      setConn("connecting", "signing in...");
      sendHello();
    });
    ws.addEventListener("message", (e) => {
      if (S.ws !== ws || typeof e.data !== "string") return;
      let ev;
      try {
        ev = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      if (ev && typeof ev === "object" && !Array.isArray(ev)) handleEvent(ev);
    });
    ws.addEventListener("close", () => {
      if (S.ws === ws) connectionLost();
    });
  }

  function sendHello() {
    const req = { nick: S.nick, client: "selchat-web" };
    if (S.password !== null) req.password = S.password;
    if (S.pendingLogin) {
      req.login = { account: S.pendingLogin.account, password: S.pendingLogin.password, remember: true };
    } else if (S.token && S.account) {
      req.login = { account: S.account, token: S.token };
    }
    S.helloRef = request("hello", req, null, true);
  }

  /** Forget what died with the connection; keep what the user expects back (views, rooms). */
  function connectionLost() {
    const wasRegistered = S.registered;
    S.ws = null;
    S.registered = false;
    S.pending.clear();
    S.helloRef = null;
    stopLiveness();
    const q = S.pace;
    clearTimeout(q.timer);
    q.queue = [];
    q.timer = null;
    if (wasRegistered) {
      S.rejoin = [];
      S.lobbyWanted = false;
      for (const v of S.views.values()) {
        if (v.kind === "room" && v.joined) {
          if (v.key === LOBBY) S.lobbyWanted = true;
          else S.rejoin.push(v.name);
        }
      }
    }
    for (const v of S.views.values()) {
      if (v.kind === "room") {
        v.joined = false;
        v.joining = false;
        v.namesAcc = null;
        v.loadingOlder = false;
        renderBadge(v);
      }
    }
    if (S.quitting) {
      resetToLogin(S.quitMessage || "You left the chat.");
      return;
    }
    if (!S.everRegistered) {
      setConn("offline", "offline");
      ui.loginButton.disabled = false;
      if (!ui.loginError.textContent) showLoginError("Cannot reach the chat server. Try again.");
      return;
    }
    if (wasRegistered) note("Disconnected from the server. Reconnecting...", "error");
    renderHeader();
    scheduleReconnect();
  }

  /** Waits between tries: 0.25 s doubling to a cap of 1 s for the first minute offline (a
   * restarted server is met within about a second), then 5 s, and 15 s after ten minutes.
   * Each wait is cut at random by up to half, so that the pages of a restarted server do not
   * all come at once. */
  function* backoff() {
    const since = Date.now();
    let d = 250;
    for (;;) {
      const down = Date.now() - since;
      const cap = down < 60000 ? 1000 : down < 600000 ? 5000 : 15000;
      d = Math.min(cap, d);
      yield d * (0.5 + 0.5 * Math.random());
      d = Math.min(cap, d * 2);
      if (d < cap && down >= 60000) d = cap;
    }
  }

  function scheduleReconnect() {
    if (!S.delays) S.delays = backoff();
    const delay = S.delays.next().value;
    S.retryAt = Date.now() + delay;
    const tick = () => {
      const left = Math.max(1, Math.ceil((S.retryAt - Date.now()) / 1000));
      setConn("offline", `offline, retrying in ${left} s`);
    };
    tick();
    clearInterval(S.countdown);
    S.countdown = setInterval(tick, 1000);
    clearTimeout(S.retryTimer);
    S.retryTimer = setTimeout(() => {
      clearInterval(S.countdown);
      connect();
    }, delay);
  }

  function retryNow() {
    if (S.ws || !S.everRegistered || S.quitting) return;
    clearTimeout(S.retryTimer);
    clearInterval(S.countdown);
    connect();
  }

  function startLiveness() {
    stopLiveness();
    S.livenessTimer = setInterval(() => {
      if (!S.registered || S.livenessDeadline) return;
      S.livenessToken = "web-" + Date.now();
      request("ping", { token: S.livenessToken }, null, true);
      const ws = S.ws;
      S.livenessDeadline = setTimeout(() => {
        if (S.ws === ws && ws) ws.close();
      }, LIVENESS_WAIT_MS);
    }, LIVENESS_EVERY_MS);
  }

  function stopLiveness() {
    clearInterval(S.livenessTimer);
    clearTimeout(S.livenessDeadline);
    S.livenessTimer = null;
    S.livenessDeadline = null;
  }

  /** Send a request with a fresh ref, remembered with `meta` so its answer can be matched. */
  function request(type, members, meta, now) {
    const ref = S.refs++;
    const req = Object.assign({ type }, members, { ref });
    S.pending.set(ref, Object.assign({}, req, meta || {}));
    if (S.pending.size > 1024) S.pending.delete(S.pending.keys().next().value);
    send(req, now);
    return ref;
  }

  /** Stay under the flood limit the server announced, so a burst of rejoins is not refused. */
  function send(obj, now) {
    const q = S.pace;
    const data = JSON.stringify(obj);
    if (now || q.rate <= 0) {
      if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(data);
      return;
    }
    q.queue.push(data);
    drain();
  }

  function drain() {
    const q = S.pace;
    if (q.timer) return;
    while (q.queue.length) {
      const t = performance.now() / 1000;
      q.tokens = Math.min(q.burst, q.tokens + (t - q.stamp) * q.rate);
      q.stamp = t;
      if (q.tokens < 1) {
        q.timer = setTimeout(() => {
          q.timer = null;
          drain();
        }, ((1 - q.tokens) / q.rate) * 1000 + 5);
        return;
      }
      q.tokens -= 1;
      const data = q.queue.shift();
      if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(data);
    }
  }

  function configurePace(limits) {
    const q = S.pace;
    const rate = limits && limits.rate;
    const burst = limits && limits.burst;
    if (typeof rate === "number" && rate > 0 && typeof burst === "number" && burst > 0) {
      q.rate = rate * 0.9;
      q.burst = Math.max(1, burst - 1);
    } else {
      q.rate = 0;
    }
    q.tokens = q.burst;
    q.stamp = performance.now() / 1000;
  }

  // ----- events ----------------------------------------------------------------------------

  function handleEvent(ev) {
    const ref = ev.ref;
    const req = isInt(ref) && S.pending.has(ref) ? S.pending.get(ref) : null;
    if (req && ev.type !== "names" && ev.type !== "rooms") S.pending.delete(ref);
    if (req && (ev.type === "names" || ev.type === "rooms") && ev.more !== true) S.pending.delete(ref);
    const handler = HANDLERS[ev.type];
    if (handler) handler(ev, req);
  }

  const HANDLERS = {
    ping(ev) {
      const reply = { type: "pong" };
      if ("token" in ev) reply.token = ev.token;
      send(reply, true);
    },

    pong(ev) {
      if (ev.token === S.livenessToken) {
        clearTimeout(S.livenessDeadline);
        S.livenessDeadline = null;
      }
    },

    welcome(ev) {
      const first = !S.everRegistered;
      if (typeof ev.nick === "string") S.nick = ev.nick;
      S.registered = true;
      S.everRegistered = true;
      S.helloRef = null;
      S.delays = null;
      configurePace(ev.limits);
      try {
        localStorage.setItem(NICK_KEY, S.nick);
      } catch (e) {
        /* private mode: nothing to remember */
      }
      setConn("online", "online");
      ui.meNick.textContent = S.nick;
      ui.inputNick.textContent = S.nick;
      S.welcome = ev;
      const byForm = S.pendingLogin !== null;
      S.pendingLogin = null; // the password is forgotten once used
      S.account = typeof ev.account === "string" ? ev.account : null;
      if (S.account && typeof ev.token === "string") saveToken(S.account, ev.token, byForm ? S.remember : S.tokenRemember);
      if (!S.account && S.token) forgetToken();
      renderAccount();
      if (S.registerPassword !== null) {
        request("register", { password: S.registerPassword, remember: true }, { remember: S.remember });
        S.registerPassword = null;
      }
      startLiveness();
      if (first) {
        ui.login.hidden = true;
        ui.app.hidden = false;
        ui.input.focus();
      } else {
        if (!S.restoring) note("Reconnected.", "info");
        S.restoring = false;
        const rooms = S.rejoin || [];
        for (const name of rooms) {
          const v = roomView(name, false);
          if (v) v.joining = true;
          request("join", { room: name }, { rejoin: true });
        }
        if (!S.lobbyWanted) request("part", { room: LOBBY }, { rejoin: true });
        S.rejoin = null;
        for (const v of S.views.values()) if (v.kind === "query" && v.lastId === 0) askPrivateHistory(v);
      }
      renderHeader();
    },

    message(ev) {
      const view = viewForMessage(ev);
      if (!view || !remember(view, ev)) return;
      const line = messageLine(ev, false, view);
      if (isInt(ev.id)) placeById(view, line, ev.id);
      else appendLine(view, line);
      countUnread(view, ev);
    },

    history(ev, req) {
      const priv = typeof ev.with === "string";
      const view = priv ? queryView(str(ev.with), true) : roomView(str(ev.room), false);
      if (!view) return;
      const messages = Array.isArray(ev.messages) ? ev.messages : [];
      if (req && req.type === "history") {
        if (req.initial) {
          // A conversation's past, asked for when it was opened: above whatever it shows.
          if (!view.log.querySelector(".divider.earlier")) view.log.prepend(divider(`earlier messages with ${view.name}`, "earlier"));
          olderPage(view, messages, ev.more === true);
          const d = view.log.querySelector(".divider.earlier");
          if (d && !view.log.querySelector(".line.msg.earlier")) d.remove();
          return;
        }
        olderPage(view, messages, ev.more === true);
        return;
      }
      if (priv) {
        // Unasked, after welcome: what came while this account was away.
        const keep = messages.filter((m) => m && typeof m === "object" && remember(view, m));
        if (keep.length) {
          appendLine(view, divider("while you were away", "missed"));
          for (const m of keep) {
            const line = messageLine(m, false, view);
            if (isInt(m.id)) placeById(view, line, m.id);
            else appendLine(view, line);
            countUnread(view, m);
          }
        }
        if (view.lastId === 0 || ev.more === true) view.more = ev.more === true || view.more;
        return;
      }
      // History after our own join: the room's recent past, or what we missed while offline.
      const empty = view.lastId === 0;
      const fresh = messages.filter((m) => m && typeof m === "object" && (empty || (isInt(m.id) && m.id > view.lastId)));
      if (empty) view.more = ev.more === true;
      const keep = fresh.filter((m) => remember(view, m));
      if (keep.length && empty) {
        // The room's past goes above the "you joined" line, which is when it became the past.
        const frag = document.createDocumentFragment();
        frag.append(divider(`earlier messages in ${view.name}`, "earlier"));
        for (const m of keep) frag.append(messageLine(m, true, view));
        const at = view.log.querySelector(".line.self-join");
        if (at) at.before(frag);
        else view.log.append(frag);
        fixDays(view);
        for (const m of keep) if (isInt(m.id) && m.id > view.lastId) view.lastId = m.id;
        if (view.stick) scrollToBottom(view);
      } else if (keep.length) {
        appendLine(view, divider("while you were away", "missed"));
        for (const m of keep) {
          const line = messageLine(m, false, view);
          if (isInt(m.id)) placeById(view, line, m.id);
          else appendLine(view, line);
          countUnread(view, m);
        }
      }
      if (empty && !view.more) markStart(view);
      maybeFill(view);
    },

    join(ev, req) {
      const room = str(ev.room);
      const nick = str(ev.nick);
      if (isMe(nick)) {
        let view = roomView(room, true);
        const firstTime = !view.announced;
        view.announced = true;
        if (view.name !== room) rename(view, room);
        if (!view.joined) {
          view.topic = null;
          request("mode", { room }, { quiet: true }); // for the topic lock and the settings
        }
        view.joined = true;
        view.joining = false;
        view.members.set(fold(nick), nick);
        renderBadge(view);
        if (!S.current) switchTo(view.key);
        if (firstTime) {
          if (!S.motdShown && S.welcome) {
            S.motdShown = true;
            const w = S.welcome;
            const motd = str(w.motd);
            systemLine(view, Date.now(), [`Welcome, ${S.nick}` + (w.server ? ` (${str(w.server)})` : "") + (motd ? `: ${motd}` : "")], "info");
          }
          systemLine(view, Date.now(), ["You joined ", room]).classList.add("self-join");
        }
        if (S.current === view.key) renderHeader();
        return;
      }
      const view = roomView(room, false);
      if (!view) return;
      view.members.set(fold(nick), nick);
      if (typeof ev.account === "string") view.accounts.set(fold(nick), ev.account);
      recolour(view);
      systemLine(view, Date.now(), [nickSpan(nick, view), " joined"]);
      if (S.current === view.key) renderMembers();
    },

    part(ev) {
      const room = str(ev.room);
      const nick = str(ev.nick);
      const view = roomView(room, false);
      if (!view) return;
      if (isMe(nick)) {
        removeView(view);
        return;
      }
      forgetMember(view, nick);
      systemLine(view, Date.now(), [nickSpan(nick, view), " left"]);
      if (S.current === view.key) renderMembers();
    },

    quit(ev) {
      const nick = str(ev.nick);
      const reason = str(ev.reason);
      const key = fold(nick);
      for (const view of S.views.values()) {
        if ((view.kind === "room" && view.members.has(key)) || (view.kind === "query" && view.key === key)) {
          forgetMember(view, nick);
          systemLine(view, Date.now(), [nickSpan(nick, view), " quit" + (reason ? ` (${reason})` : "")]);
        }
      }
      renderMembers();
    },

    nick(ev) {
      const oldNick = str(ev.old);
      const newNick = str(ev.new);
      const oldKey = fold(oldNick);
      const mine = isMe(oldNick);
      if (mine) {
        S.nick = newNick;
        ui.meNick.textContent = newNick;
        ui.inputNick.textContent = newNick;
        try {
          localStorage.setItem(NICK_KEY, newNick);
        } catch (e) {
          /* ignore */
        }
      }
      for (const view of Array.from(S.views.values())) {
        const inRoom = view.kind === "room" && view.members.has(oldKey);
        const isPeer = view.kind === "query" && view.key === oldKey;
        if (!inRoom && !isPeer && !(mine && view.kind === "query")) continue;
        const newKey = fold(newNick);
        if (inRoom) {
          view.members.delete(oldKey);
          view.members.set(newKey, newNick);
          if (view.ops.delete(oldKey)) view.ops.add(newKey);
          if (view.voiced.delete(oldKey)) view.voiced.add(newKey);
          if (view.accounts.has(oldKey)) {
            view.accounts.set(newKey, view.accounts.get(oldKey));
            view.accounts.delete(oldKey);
          }
          recolour(view);
        }
        if (isPeer && !S.views.has(newKey)) rekey(view, newNick);
        const parts = mine ? ["You are now known as ", nickSpan(newNick, view)] : [nickSpan(oldNick, view), " is now known as ", nickSpan(newNick, view)];
        systemLine(view, Date.now(), parts);
      }
      renderMembers();
    },

    names(ev, req) {
      const room = str(ev.room);
      const view = roomView(room, false);
      const acc = (view && view.namesAcc) || (req && req.acc) || { nicks: [], ops: [], voiced: [], accounts: {} };
      if (Array.isArray(ev.nicks)) acc.nicks.push(...ev.nicks.map(str));
      if (Array.isArray(ev.operators)) acc.ops.push(...ev.operators.map(str));
      if (Array.isArray(ev.voiced)) acc.voiced.push(...ev.voiced.map(str));
      if (ev.accounts && typeof ev.accounts === "object" && !Array.isArray(ev.accounts)) {
        for (const [n, a] of Object.entries(ev.accounts)) if (typeof a === "string") acc.accounts[n] = a;
      }
      if (ev.more === true) {
        if (view) view.namesAcc = acc;
        else if (req) req.acc = acc;
        return;
      }
      const final = req && req.acc ? req.acc : acc;
      if (view) {
        view.namesAcc = null;
        if (view.joined || !S.registered) {
          view.members = new Map(final.nicks.map((n) => [fold(n), n]));
          view.ops = new Set(final.ops.map(fold));
          view.voiced = new Set(final.voiced.map(fold));
          view.accounts = new Map(Object.entries(final.accounts).map(([n, a]) => [fold(n), str(a)]));
          recolour(view);
          if (S.current === view.key) {
            renderMembers();
            renderHeader();
          }
        }
      }
      if (req && req.type === "who") {
        const opSet = new Set(final.ops.map(fold));
        const voiceSet = new Set(final.voiced.map(fold));
        const shown = final.nicks.map((n) => (opSet.has(fold(n)) ? "@" + n : voiceSet.has(fold(n)) ? "+" + n : n));
        const where = view || currentView();
        if (where) {
          systemLine(where, Date.now(), [`${final.nicks.length} in ${room}: ${shown.join(" ")}`], "info");
        }
      }
    },

    rooms(ev, req) {
      if (Array.isArray(ev.rooms)) S.roomsAcc.push(...ev.rooms);
      if (ev.more === true) {
        // A long list stops where the server's buffer for us is full; `next` says where to go on.
        if (isInt(ev.next) && ev.next > 0 && S.roomsAcc.length < 100000) request("rooms", { offset: ev.next });
        return;
      }
      const list = S.roomsAcc;
      S.roomsAcc = [];
      const view = currentView();
      if (!view) return;
      const parts = [`${list.length} room${list.length === 1 ? "" : "s"}: `];
      list.forEach((r, i) => {
        if (i) parts.push(", ");
        const name = str(r && r.name);
        const link = el("button", "room-link", name);
        link.type = "button";
        link.title = `join ${name}`;
        link.addEventListener("click", () => {
          runLine("/join " + name);
          ui.input.focus();
        });
        parts.push(link, ` (${str(r && r.members)})`);
      });
      systemLine(view, Date.now(), parts, "info");
    },

    notice(ev) {
      note("notice: " + str(ev.text), "notice");
    },

    account(ev, req) {
      if (req && (req.type === "register" || req.type === "login" || req.type === "password")) {
        if (typeof ev.account === "string") {
          S.account = ev.account;
          if (typeof ev.token === "string") saveToken(ev.account, ev.token, req.remember !== false);
          if (req.type === "register") note(`Registered: ${ev.account} is your account now. Log in with it from any device.`, "info");
          else if (req.type === "login") note(`Logged in as ${ev.account}.`, "info");
          else note("Password changed.", "info");
          for (const v of S.views.values()) {
            if (v.kind === "room" && v.members.has(fold(S.nick))) v.accounts.set(fold(S.nick), ev.account);
            if (v.kind === "query" && v.lastId === 0) askPrivateHistory(v);
          }
        }
        if (ui.registerPanel.open) ui.registerPanel.close();
        renderAccount();
        renderMembers();
        return;
      }
      if (req && req.type === "logout") {
        // Logged out: the server closes this connection next.
        forgetToken();
        S.account = null;
        S.quitting = true;
        S.quitMessage = "You logged out.";
        return;
      }
      const nick = str(ev.nick);
      const key = fold(nick);
      for (const v of S.views.values()) {
        if (v.kind !== "room" || !v.members.has(key)) continue;
        if (typeof ev.account === "string") v.accounts.set(key, ev.account);
        else v.accounts.delete(key);
      }
      renderMembers();
    },

    topic(ev, req) {
      const view = roomView(str(ev.room), false);
      if (!view) return;
      const text = str(ev.text);
      const by = str(ev.by);
      const ts = isInt(ev.ts) ? ev.ts : Date.now();
      // The topic a joiner is told comes with the join's ref; a change made by someone else
      // comes without one, and our own change with the ref of our topic request.
      const told = isInt(ev.ref) && !(req && req.type === "topic");
      view.topic = { text, by, ts };
      if (!told) {
        const parts = text ? [nickSpan(by, view), " set the topic: ", text] : [nickSpan(by, view), " cleared the topic"];
        systemLine(view, Date.now(), parts);
      }
      if (S.current === view.key) renderTopic();
    },

    kick(ev) {
      const view = roomView(str(ev.room), false);
      if (!view) return;
      const nick = str(ev.nick);
      const by = str(ev.by);
      const reason = str(ev.reason);
      const why = reason && reason !== nick ? ` (${reason})` : "";
      if (isMe(nick)) {
        view.joined = false;
        view.members = new Map();
        view.ops = new Set();
        view.voiced = new Set();
        view.accounts = new Map();
        systemLine(view, Date.now(), ["You were kicked from ", view.name, " by ", nickSpan(by, view), why + `: /join ${view.name} to come back`], "error");
        if (S.current !== view.key) {
          view.unread += 1;
          view.mention = true;
        }
        renderBadge(view);
        updateTitle();
        if (S.current === view.key) {
          renderHeader();
          renderMembers();
          renderTopic();
        }
        return;
      }
      forgetMember(view, nick);
      systemLine(view, Date.now(), [nickSpan(nick, view), " was kicked by ", nickSpan(by, view), why]);
      if (S.current === view.key) renderMembers();
    },

    invite(ev) {
      const room = str(ev.room);
      // Our own copy is the one we sent (`by` is us); the invitee's may name the invitee too.
      if (isMe(ev.by)) {
        note(`You invited ${str(ev.nick)} to ${room}.`, "info");
        return;
      }
      const view = currentView();
      if (!view) return;
      const link = el("button", "room-link", room);
      link.type = "button";
      link.title = `join ${room}`;
      link.addEventListener("click", () => {
        runLine("/join " + room);
        ui.input.focus();
      });
      systemLine(view, Date.now(), [nickSpan(str(ev.by), view), " invites you to ", link], "info");
    },

    mode(ev) {
      const view = roomView(str(ev.room), false);
      if (!view) return;
      const set = ev.set && typeof ev.set === "object" && !Array.isArray(ev.set) ? ev.set : {};
      if (Array.isArray(ev.bans) || ev.by === undefined) {
        // The answer to `mode` {room}: everything in force.
        view.modes = {
          moderated: set.moderated === true,
          invite_only: set.invite_only === true,
          topic_locked: set.topic_locked === true,
          secret: set.secret === true,
          key: typeof set.key === "string" ? set.key : null,
          limit: isInt(set.limit) ? set.limit : null,
        };
        view.bans = Array.isArray(ev.bans) ? ev.bans.map(str) : [];
      } else {
        applyModeChange(view, str(ev.by), set);
      }
      if (S.current === view.key) {
        renderMembers();
        renderTopic();
        renderSettings();
      }
    },

    error(ev, req) {
      const code = str(ev.code);
      const message = str(ev.message);
      if (isInt(ev.ref) && ev.ref === S.helloRef) {
        S.helloRef = null;
        helloRefused(code, message);
        return;
      }
      if (req && req.type === "join") {
        const view = roomView(str(req.room), false);
        if (view) view.joining = false;
        if (view && !view.joined && view.log.querySelector(".line.msg") === null) {
          removeView(view);
          if (req.previous && S.views.has(req.previous)) switchTo(req.previous);
        }
      }
      if (req && req.type === "history") {
        const view = req.with !== undefined ? queryView(str(req.with), false) : roomView(str(req.room), false);
        if (view) {
          view.loadingOlder = false;
          view.olderPausedUntil = Date.now() + 10000; // no error storm while scrolling at the top
        }
        // A guest on either side has no private history: nothing to say.
        if (req.with !== undefined && (code === "not_logged_in" || code === "no_such_nick")) {
          if (view) view.more = false;
          return;
        }
      }
      if (req && req.type === "join") {
        const hint = {
          bad_key: ` (/join ${str(req.room)} KEY)`,
          invite_only: ": an operator can /invite you",
        }[code];
        if (hint) {
          note(`Cannot join ${str(req.room)}: ${message}${hint}`, "error");
          return;
        }
      }
      if (req && (req.type === "register" || req.type === "login")) {
        const what = req.type === "register" ? "Could not register" : "Could not log in";
        note(`${what}: ${message || code}`, "error");
        if (!ui.registerPanel.hidden && ui.registerPanel.open) ui.registerError.textContent = message || code;
        return;
      }
      if (req && (req.type === "ping" || req.quiet)) return;
      note(`error ${code}: ${message}`, "error");
    },
  };

  function olderPage(view, messages, more) {
    view.loadingOlder = false;
    view.more = more;
    const log = view.log;
    for (const d of log.querySelectorAll(".divider.day")) d.remove();
    const fromBottom = log.scrollHeight - log.scrollTop;
    const first = firstMessage(view);
    const anchor = first || log.firstChild;
    let added = 0;
    const frag = document.createDocumentFragment();
    for (const m of messages) {
      if (!m || typeof m !== "object" || !isInt(m.id)) continue;
      if (view.oldestId !== null && m.id >= view.oldestId) continue;
      if (view.seen.has(m.id)) continue;
      frag.append(messageLine(m, true, view));
      added += 1;
    }
    for (const m of messages) if (m && isInt(m.id) && (view.oldestId === null || m.id < view.oldestId)) remember(view, m);
    const before = anchor ? anchor.previousElementSibling : null;
    if (before && before.classList.contains("divider") && before.classList.contains("earlier")) {
      before.after(frag);
    } else if (anchor) {
      anchor.before(frag);
    } else {
      log.append(frag);
    }
    fixDays(view);
    if (!more) markStart(view);
    log.scrollTop = log.scrollHeight - fromBottom;
    if (!added && more) return;
    maybeFill(view);
  }

  function markStart(view) {
    if (view.startShown) return;
    view.startShown = true;
    const first = view.log.firstElementChild;
    if (first && first.classList.contains("divider") && first.classList.contains("earlier")) {
      // Everything there is fits on the page: one line says both.
      first.classList.add("start");
      first.textContent = `start of ${view.name}: earlier messages`;
      return;
    }
    view.log.prepend(divider(`start of ${view.name}`, "start"));
  }

  /** Ask for an older page of a room's history (scrolling to the top does this). */
  function loadOlder(view, limit) {
    if (!view.more || view.loadingOlder || !S.registered) return false;
    if (view.kind === "room" ? !view.joined : !S.account) return false;
    if (view.olderPausedUntil && Date.now() < view.olderPausedUntil) return false;
    view.loadingOlder = true;
    const members = view.kind === "room" ? { room: view.name, limit } : { with: view.name, limit };
    if (view.oldestId !== null) members.before = view.oldestId;
    request("history", members);
    return true;
  }

  /** A short history does not fill the screen, so there is nothing to scroll: load more. */
  function maybeFill(view) {
    if (S.current !== view.key) return;
    if (view.log.scrollHeight <= view.log.clientHeight + 4) loadOlder(view, HISTORY_PAGE);
  }

  // ----- accounts and running a room --------------------------------------------------------

  function loadToken() {
    for (const [where, remember] of [["localStorage", true], ["sessionStorage", false]]) {
      try {
        const v = JSON.parse(window[where].getItem(LOGIN_KEY) || "null");
        if (v && typeof v.account === "string" && typeof v.token === "string") return { account: v.account, token: v.token, remember };
      } catch (e) {
        /* no storage here */
      }
    }
    return null;
  }

  /** The token only, never the password: in localStorage when the user asked to stay logged
   * in on this device, else in sessionStorage (a reload keeps it, closing the tab does not). */
  function saveToken(account, token, remember) {
    forgetToken();
    S.token = token;
    S.tokenRemember = remember;
    try {
      (remember ? localStorage : sessionStorage).setItem(LOGIN_KEY, JSON.stringify({ account, token }));
    } catch (e) {
      /* kept in memory for this page's reconnects only */
    }
  }

  function forgetToken() {
    S.token = null;
    try {
      localStorage.removeItem(LOGIN_KEY);
      sessionStorage.removeItem(LOGIN_KEY);
    } catch (e) {
      /* ignore */
    }
  }

  function renderAccount() {
    ui.meAccount.textContent = S.account ? `account ${S.account}` : "guest";
    ui.registerOpen.hidden = !!S.account;
    ui.logout.hidden = !S.account;
  }

  function amOp(view) {
    return !!view && view.kind === "room" && view.joined && view.ops.has(fold(S.nick));
  }

  /** A conversation's past (accounts only; the server says no for guests, quietly). */
  function askPrivateHistory(view) {
    if (!S.account || !S.registered || view.kind !== "query" || view.askedHistory) return;
    view.askedHistory = true;
    request("history", { with: view.name, limit: HISTORY_PAGE }, { initial: true });
  }

  function openQuery(nick) {
    const v = queryView(nick, true);
    switchTo(v.key);
    if (v.lastId === 0) askPrivateHistory(v);
    return v;
  }

  const FLAG_WORDS = {
    moderated: ["made the room moderated", "made the room unmoderated"],
    invite_only: ["made the room invite-only", "opened the room to everyone"],
    topic_locked: ["locked the topic", "unlocked the topic"],
    secret: ["made the room secret", "made the room public"],
  };

  /** A `mode` event: what changed, applied to the view and told in a line of words. */
  function applyModeChange(view, by, set) {
    if (!view.modes) view.modes = { moderated: false, invite_only: false, topic_locked: false, secret: false, key: null, limit: null };
    const said = [];
    const nicks = (v) => (Array.isArray(v) ? v.map(str) : []);
    for (const [name, value] of Object.entries(set)) {
      if (FLAG_WORDS[name]) {
        view.modes[name] = value === true;
        said.push(FLAG_WORDS[name][value === true ? 0 : 1]);
      } else if (name === "key") {
        view.modes.key = typeof value === "string" ? value : null;
        said.push(typeof value === "string" ? "set a key" : "removed the key");
      } else if (name === "limit") {
        view.modes.limit = isInt(value) ? value : null;
        said.push(isInt(value) ? `limited the room to ${value}` : "removed the limit");
      } else if (name === "op" || name === "deop" || name === "voice" || name === "devoice") {
        const group = name.endsWith("op") ? view.ops : view.voiced;
        for (const n of nicks(value)) {
          if (name === "op" || name === "voice") group.add(fold(n));
          else group.delete(fold(n));
        }
        const words = { op: "made %s operator", deop: "took operator from %s", voice: "gave voice to %s", devoice: "took voice from %s" }[name];
        if (nicks(value).length) said.push(words.replace("%s", nicks(value).join(", ")));
      } else if (name === "ban" || name === "unban") {
        for (const m of nicks(value)) {
          const i = view.bans.indexOf(m);
          if (name === "ban" && i < 0) view.bans.push(m);
          if (name === "unban" && i >= 0) view.bans.splice(i, 1);
        }
        if (nicks(value).length) said.push(`${name === "ban" ? "banned" : "unbanned"} ${nicks(value).join(", ")}`);
      }
    }
    if (said.length) systemLine(view, Date.now(), [nickSpan(by, view), " " + said.join(", ")]);
  }

  function setModes(view, set) {
    if (!connected()) return false;
    request("mode", { room: view.name, set });
    return true;
  }

  // --- the topic bar

  function canSetTopic(view) {
    return !!view && view.kind === "room" && view.joined && (amOp(view) || !(view.modes && view.modes.topic_locked));
  }

  function renderTopic() {
    const view = currentView();
    const room = view && view.kind === "room";
    ui.topic.hidden = !room;
    ui.settingsToggle.hidden = !room || !view.joined;
    if (!room) return;
    const t = view.topic;
    const editable = canSetTopic(view);
    ui.topicText.replaceChildren();
    if (t && t.text) {
      linkify(ui.topicText, t.text);
      ui.topicText.title = `set by ${t.by} on ${new Date(t.ts).toLocaleString()}` + (editable ? " (click to change)" : "");
    } else {
      ui.topicText.append(editable ? "No topic: click to set one" : "No topic");
      ui.topicText.title = "";
    }
    ui.topicText.classList.toggle("empty", !(t && t.text));
    ui.topicText.disabled = !editable;
    ui.topic.classList.toggle("editable", editable);
  }

  function editTopic() {
    const view = currentView();
    if (!canSetTopic(view)) return;
    ui.topicInput.value = view.topic ? view.topic.text : "";
    ui.topicText.hidden = true;
    ui.topicForm.hidden = false;
    ui.topicInput.focus();
    ui.topicInput.select();
  }

  function endTopicEdit() {
    ui.topicForm.hidden = true;
    ui.topicText.hidden = false;
    ui.input.focus();
  }

  // --- the room settings panel

  function openSettings() {
    const view = currentView();
    if (!view || view.kind !== "room" || !view.joined) return;
    ui.settings.dataset.view = view.key;
    if (S.registered) request("mode", { room: view.name }, { quiet: true });
    renderSettings();
    ui.settings.showModal();
  }

  function settingsView() {
    return ui.settings.open ? S.views.get(ui.settings.dataset.view) || null : null;
  }

  function renderSettings() {
    const view = settingsView();
    if (!view) return;
    const op = amOp(view);
    const m = view.modes || { moderated: false, invite_only: false, topic_locked: false, secret: false, key: null, limit: null };
    ui.settingsTitle.textContent = `${view.name} settings`;
    ui.settingsNote.textContent = op ? "You are an operator here: changes apply at once." : "Only the room's operators change these.";
    for (const box of ui.settings.querySelectorAll("input[data-mode]")) {
      box.checked = m[box.dataset.mode] === true;
      box.disabled = !op;
    }
    if (document.activeElement !== ui.modeKey) ui.modeKey.value = m.key || "";
    if (document.activeElement !== ui.modeLimit) ui.modeLimit.value = m.limit === null ? "" : String(m.limit);
    for (const c of [ui.modeKey, ui.modeLimit, ui.modeKeySet, ui.modeLimitSet, ui.banMask, ui.banAdd]) c.disabled = !op;
    const items = view.bans.map((mask) => {
      const li = el("li");
      li.dataset.mask = mask;
      li.append(el("code", null, mask));
      const b = el("button", "unban", "Unban");
      b.type = "button";
      b.disabled = !op;
      b.addEventListener("click", () => setModes(view, { unban: [mask] }));
      li.append(b);
      return li;
    });
    if (!items.length) items.push(el("li", "none", "Nobody is banned."));
    ui.banList.replaceChildren(...items);
  }

  // --- the member menu

  function openMemberMenu(li) {
    const view = currentView();
    if (!view || view.kind !== "room") return;
    const nick = li.dataset.nick;
    const key = fold(nick);
    const op = amOp(view);
    ui.menu.dataset.nick = nick;
    ui.menuNick.textContent = nick;
    const account = view.accounts.get(key);
    const role = view.ops.has(key) ? "operator" : view.voiced.has(key) ? "voiced" : "";
    ui.menuInfo.textContent = [role, account ? `account ${account}` : "guest"].filter(Boolean).join(", ");
    ui.menuOps.hidden = !op;
    ui.menu.querySelector('[data-act="query"]').hidden = isMe(nick);
    ui.menu.querySelector('[data-act="op"]').hidden = view.ops.has(key);
    ui.menu.querySelector('[data-act="deop"]').hidden = !view.ops.has(key);
    ui.menu.querySelector('[data-act="voice"]').hidden = view.voiced.has(key);
    ui.menu.querySelector('[data-act="devoice"]').hidden = !view.voiced.has(key);
    for (const act of ["kick", "ban"]) ui.menu.querySelector(`[data-act="${act}"]`).hidden = isMe(nick);
    ui.menuReason.hidden = isMe(nick);
    ui.menuReason.value = "";
    ui.menu.hidden = false;
    const r = li.getBoundingClientRect();
    const w = ui.menu.offsetWidth;
    const h = ui.menu.offsetHeight;
    const left = Math.max(8, Math.min(r.left, window.innerWidth - w - 8));
    const top = r.bottom + h + 8 > window.innerHeight ? Math.max(8, r.top - h) : r.bottom;
    ui.menu.style.left = `${left}px`;
    ui.menu.style.top = `${top}px`;
    const first = Array.from(ui.menu.querySelectorAll("button")).find((b) => !b.hidden && b.offsetParent !== null);
    if (first) first.focus();
  }

  function closeMemberMenu() {
    ui.menu.hidden = true;
  }

  function onMenuClick(e) {
    const b = e.target.closest("button[data-act]");
    if (!b) return;
    const view = currentView();
    const nick = ui.menu.dataset.nick;
    const reason = ui.menuReason.value.trim();
    closeMemberMenu();
    if (!view || !nick) return;
    const act = b.dataset.act;
    if (act === "query") {
      openQuery(nick);
      closeDrawers();
      ui.input.focus();
      return;
    }
    if (!connected()) return;
    if (act === "kick") request("kick", Object.assign({ room: view.name, nick }, reason ? { reason } : {}));
    else if (act === "ban") {
      // By account when there is one, so that a new nick does not get round it.
      const account = view.accounts.get(fold(nick));
      setModes(view, { ban: [account ? `account:${account}` : nick] });
      request("kick", Object.assign({ room: view.name, nick }, reason ? { reason } : {}));
    } else setModes(view, { [act]: [nick] });
    ui.input.focus();
  }

  // --- registering, logging out

  function openRegister() {
    if (S.account || !S.registered) return;
    closeDrawers();
    ui.registerNick.textContent = S.nick;
    ui.registerPassword.value = "";
    ui.registerError.textContent = "";
    ui.registerPanel.showModal();
    ui.registerPassword.focus();
  }

  function passwordProblem(pw) {
    const n = new TextEncoder().encode(pw).length;
    if (n < 8) return "A password has at least 8 characters.";
    if (n > 256) return "A password has at most 256 bytes.";
    return null;
  }

  function onRegisterSubmit(e) {
    e.preventDefault();
    const pw = ui.registerPassword.value;
    const problem = passwordProblem(pw);
    if (problem) {
      ui.registerError.textContent = problem;
      ui.registerPassword.focus();
      return;
    }
    if (!connected()) return;
    ui.registerError.textContent = "";
    request("register", { password: pw, remember: true }, { remember: ui.registerRemember.checked });
    ui.registerPassword.value = "";
  }

  function logout() {
    if (!S.account) return;
    if (!S.registered || !S.ws) {
      forgetToken();
      resetToLogin("You logged out.");
      return;
    }
    request("logout", S.token ? { token: S.token } : {}, null, true);
  }

  // --- the login form's three ways in

  function setLoginMode(mode) {
    S.loginMode = mode;
    for (const tab of ui.loginTabs) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    ui.secretRow.hidden = mode === "guest";
    ui.nickLabel.textContent = mode === "login" ? "Account" : "Nickname";
    ui.secretLabel.textContent = mode === "register" ? "Password (8 characters or more)" : "Password";
    ui.secret.autocomplete = mode === "register" ? "new-password" : "current-password";
    ui.nickInput.autocomplete = mode === "guest" ? "off" : "username";
    ui.loginButton.textContent = { guest: "Join the chat", login: "Log in", register: "Register and join" }[mode];
    showLoginError("");
  }

  // ----- login -----------------------------------------------------------------------------

  /** The form's error line; with a suggestion, a button that puts it in the field. */
  function showLoginError(text, suggestion) {
    ui.loginError.textContent = text;
    if (suggestion) {
      const use = el("button", "suggest", `Use \u201c${suggestion}\u201d`);
      use.type = "button";
      use.id = "login-suggest";
      use.addEventListener("click", () => {
        ui.nickInput.value = suggestion;
        showLoginError("");
        ui.nickInput.focus();
      });
      ui.loginError.append(" ", use);
    }
  }

  function helloRefused(code, message) {
    if (code === "login_failed" || code === "login_throttled") {
      const byToken = S.pendingLogin === null;
      const account = S.pendingLogin ? S.pendingLogin.account : S.account;
      S.pendingLogin = null;
      S.registerPassword = null;
      if (byToken && code === "login_failed") forgetToken(); // (throttled: it may still be good)
      S.account = null;
      resetToLogin("");
      setLoginMode("login");
      ui.nickInput.value = account || S.nick;
      showLoginError(byToken && code === "login_failed" ? "Your saved login is no longer valid: log in again." : message || code);
      ui.secret.focus();
      return;
    }
    if (code === "nick_reserved" && S.everRegistered) {
      const nick = S.nick;
      resetToLogin("");
      ui.nickInput.value = nick;
      showLoginError(message || "That nickname belongs to an account: log in to use it, or choose another.");
      return;
    }
    if (!S.everRegistered) {
      ui.loginButton.disabled = false;
      const fallback = {
        nick_taken: "That nickname is taken. Choose another.",
        nick_reserved: "That nickname belongs to an account: log in to use it, or choose another.",
        bad_nick: "Nicknames are 1-32 letters, digits or _-[]{}\\|^, not starting with a digit or -.",
        bad_password: "The server wants a password.",
      };
      showLoginError(message || fallback[code] || code);
      if (code === "bad_password") {
        ui.passwordRow.hidden = false;
        ui.password.focus();
      } else if (code === "nick_reserved") {
        setLoginMode("login");
        showLoginError(message || fallback[code]);
        ui.secret.focus();
      } else {
        ui.nickInput.focus();
        ui.nickInput.select();
      }
      setConn(S.ws ? "connecting" : "offline", S.ws ? "connected, not signed in" : "offline");
      return;
    }
    // Reconnecting: the dead connection may still hold our nick for a while. Keep trying.
    if (code === "nick_taken" && S.restoring && ++S.restoreTries > 3) {
      // After a reload someone else has the nick (another tab, say): back to the form.
      const nick = S.nick;
      resetToLogin("");
      ui.nickInput.value = nick;
      showLoginError(message || "That nickname is taken. Choose another.");
      return;
    }
    if (code === "nick_taken") {
      setConn("connecting", "waiting for the nickname to be free...");
      const ws = S.ws;
      setTimeout(() => {
        if (S.ws === ws && ws && ws.readyState === WebSocket.OPEN && !S.registered) sendHello();
      }, 2000 * (0.5 + Math.random()));
      return;
    }
    if (code === "bad_password") {
      // The server wants a password now (restarted with one): back to the login form, which
      // asks for it. Signing in again starts afresh.
      resetToLogin("");
      showLoginError(message || "The server now wants a password.");
      ui.passwordRow.hidden = false;
      ui.password.focus();
      return;
    }
    if (S.restoring) {
      resetToLogin("");
      showLoginError(message || code);
      return;
    }
    note(`cannot sign in again: ${code}: ${message}`, "error");
    S.quitting = false;
    if (S.ws) S.ws.close();
  }

  function onLoginSubmit(e) {
    e.preventDefault();
    const nick = ui.nickInput.value.trim();
    const problem = nickProblem(nick);
    if (problem) {
      showLoginError(problem.why, problem.suggestion);
      ui.nickInput.focus();
      return;
    }
    const secret = ui.secret.value;
    if (S.loginMode !== "guest") {
      const bad = S.loginMode === "register" ? passwordProblem(secret) : secret ? null : "Type your password.";
      if (bad) {
        showLoginError(bad);
        ui.secret.focus();
        return;
      }
    }
    showLoginError("");
    S.nick = nick;
    S.password = ui.passwordRow.hidden ? null : ui.password.value;
    S.quitting = false;
    S.remember = ui.remember.checked;
    S.pendingLogin = S.loginMode === "login" ? { account: nick, password: secret } : null;
    S.registerPassword = S.loginMode === "register" ? secret : null;
    if (S.loginMode === "guest" && S.token) forgetToken();
    ui.secret.value = "";
    ui.loginButton.disabled = true;
    if (S.ws && S.ws.readyState === WebSocket.OPEN) {
      sendHello();
    } else {
      connect();
    }
  }

  function resetToLogin(message) {
    clearTimeout(S.retryTimer);
    clearInterval(S.countdown);
    for (const v of Array.from(S.views.values())) {
      v.log.remove();
      v.li.remove();
    }
    S.views.clear();
    S.current = null;
    S.everRegistered = false;
    S.registered = false;
    S.quitting = false;
    S.motdShown = false;
    S.rejoin = null;
    S.delays = null;
    S.restoring = false;
    S.restoreTries = 0;
    S.quitMessage = "";
    S.account = S.token ? S.account : null;
    if (ui.settings.open) ui.settings.close();
    if (ui.registerPanel.open) ui.registerPanel.close();
    closeMemberMenu();
    if (S.ws) {
      const ws = S.ws;
      S.ws = null;
      ws.close();
    }
    forgetSession();
    setConn("offline", "offline");
    ui.app.hidden = true;
    ui.login.hidden = false;
    ui.loginButton.disabled = false;
    ui.nickInput.value = S.nick;
    showLoginError("");
    ui.loginState.textContent = message;
    ui.nickInput.focus();
    updateTitle();
  }

  // ----- a reload puts the page back ------------------------------------------------------

  /** Kept in this tab's sessionStorage when the page goes away: the nick, the rooms, the
   * conversations and the view shown. Nothing is kept once the user quits. */
  function saveSession() {
    if (!S.everRegistered || S.quitting) return;
    const rooms = [];
    const queries = [];
    for (const key of viewOrder()) {
      const v = S.views.get(key);
      if (v.kind === "query") queries.push(v.name);
      else if (v.joined || v.joining || !S.registered) rooms.push(v.name);
    }
    const saved = { nick: S.nick, rooms, queries, current: S.current };
    try {
      sessionStorage.setItem(SESSION_KEY, JSON.stringify(saved));
    } catch (e) {
      /* storage full or refused: a reload starts afresh */
    }
  }

  function forgetSession() {
    try {
      sessionStorage.removeItem(SESSION_KEY);
    } catch (e) {
      /* ignore */
    }
  }

  /** After a reload: the views as they were, then sign in again as after a dropped
   * connection (same nick, the rooms joined again, #lobby left if it had been). */
  function restoreSession() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    } catch (e) {
      saved = null;
    }
    if (!saved || typeof saved !== "object" || typeof saved.nick !== "string" || nickProblem(saved.nick)) return false;
    const rooms = Array.isArray(saved.rooms) ? saved.rooms.filter((r) => typeof r === "string" && r.startsWith("#")).slice(0, 100) : [];
    const queries = Array.isArray(saved.queries) ? saved.queries.filter((q) => typeof q === "string" && !nickProblem(q)).slice(0, 100) : [];
    S.nick = saved.nick;
    S.everRegistered = true;
    S.restoring = true;
    S.lobbyWanted = rooms.some((r) => fold(r) === LOBBY);
    S.rejoin = rooms.filter((r) => fold(r) !== LOBBY);
    for (const r of rooms) roomView(r, true).joining = true;
    for (const q of queries) queryView(q, true);
    const current = typeof saved.current === "string" && S.views.has(saved.current) ? saved.current : viewOrder()[0];
    if (current) switchTo(current);
    ui.meNick.textContent = S.nick;
    ui.inputNick.textContent = S.nick;
    ui.login.hidden = true;
    ui.app.hidden = false;
    ui.input.focus();
    connect();
    return true;
  }

  // ----- what the user types ---------------------------------------------------------------

  function runLine(line) {
    if (!line.trim()) return true;
    if (line.startsWith("/") && !line.startsWith("//")) return command(line);
    const text = line.startsWith("//") ? line.slice(1) : line;
    return say(text, false);
  }

  function say(text, action) {
    const view = currentView();
    if (!view) {
      note("You are in no room: /join #room first.", "error");
      return false;
    }
    if (!connected()) return false;
    const extra = action ? { action: true } : {};
    if (view.kind === "room") {
      if (!view.joined && !view.joining) {
        note(`You are not in ${view.name}: /join ${view.name} to join it again.`, "error");
        return false;
      }
      request("say", Object.assign({ room: view.name, text }, extra));
    } else {
      request("msg", Object.assign({ to: view.name, text }, extra));
    }
    return true;
  }

  function connected() {
    if (S.registered && S.ws && S.ws.readyState === WebSocket.OPEN) return true;
    note("Not connected: nothing was sent. It stays in the input; press Enter again once online.", "error");
    return false;
  }

  function usage(which) {
    const c = typeof which === "number" ? COMMANDS[which] : COMMANDS.find(([u]) => u.split(" ")[0] === "/" + which);
    note(`usage: ${c[0]} (${c[1]})`, "error");
    return false;
  }

  function command(line) {
    const space = line.indexOf(" ");
    const name = (space < 0 ? line.slice(1) : line.slice(1, space)).toLowerCase();
    const rest = space < 0 ? "" : line.slice(space + 1).trim();
    const view = currentView();
    switch (name) {
      case "join":
      case "j": {
        const jm = /^(\S+)(?:\s+(\S+))?$/.exec(rest);
        if (!jm) return usage("join");
        if (!connected()) return false;
        const room = normalizeRoom(jm[1]);
        const previous = S.current;
        const v = roomView(room, true);
        switchTo(v.key);
        v.joining = true;
        const members = { room: v.joined ? v.name : room };
        if (jm[2]) members.key = jm[2];
        request("join", members, { previous });
        return true;
      }
      case "part":
      case "leave": {
        if (/\s/.test(rest)) return usage(1);
        const target = rest ? roomView(normalizeRoom(rest), false) : view;
        if (!rest && (!view || view.kind !== "room")) {
          note("This is not a room: /close closes a conversation.", "error");
          return false;
        }
        if (target && !target.joined) {
          removeView(target);
          return true;
        }
        if (!connected()) return false;
        request("part", { room: target ? target.name : normalizeRoom(rest) });
        return true;
      }
      case "close": {
        if (!view) return true;
        if (view.kind === "query" || !view.joined) {
          removeView(view);
          return true;
        }
        if (!connected()) return false;
        request("part", { room: view.name });
        return true;
      }
      case "query":
      case "q": {
        const m = /^(\S+)(?:\s+([\s\S]*))?$/.exec(rest);
        if (!m || m[1].startsWith("#")) return usage(2);
        openQuery(m[1]);
        if (m[2] && m[2].trim()) return say(m[2], false);
        return true;
      }
      case "msg": {
        const m = /^(\S+)\s+([\s\S]*\S[\s\S]*)$/.exec(rest);
        if (!m) return usage(3);
        if (!connected()) return false;
        request("msg", { to: m[1], text: m[2] });
        return true;
      }
      case "me": {
        if (!rest) return usage(4);
        return say(rest, true);
      }
      case "nick": {
        if (!rest) return usage(5);
        const problem = nickProblem(rest);
        if (problem) {
          // The suggestion goes into the input: Enter takes it, or edit it.
          note(problem.why + (problem.suggestion ? ` Press Enter for /nick ${problem.suggestion}, or edit it.` : ""), "error");
          if (problem.suggestion) ui.input.value = "/nick " + problem.suggestion;
          return false;
        }
        if (!connected()) return false;
        request("nick", { nick: rest });
        return true;
      }
      case "who": {
        if (/\s/.test(rest)) return usage(6);
        const room = rest ? normalizeRoom(rest) : view && view.kind === "room" ? view.name : null;
        if (!room) {
          note("This is not a room: /who #room", "error");
          return false;
        }
        if (!connected()) return false;
        request("who", { room });
        return true;
      }
      case "rooms":
      case "list": {
        if (!connected()) return false;
        S.roomsAcc = [];
        request("rooms", {});
        return true;
      }
      case "history": {
        let n = HISTORY_PAGE;
        if (rest) {
          n = Number(rest);
          if (!Number.isInteger(n) || n < 1 || n > 200) {
            note("/history takes 1..200", "error");
            return false;
          }
        }
        if (!view || view.kind !== "room") {
          note("History is kept for rooms only.", "error");
          return false;
        }
        if (!connected()) return false;
        if (!view.more) {
          note(`That is the start of ${view.name}.`, "info");
          return true;
        }
        loadOlder(view, n);
        return true;
      }
      case "quit": {
        S.quitting = true;
        if (S.ws && S.ws.readyState === WebSocket.OPEN) {
          request("quit", rest ? { reason: rest } : {}, null, true);
        } else {
          if (S.ws) S.ws.close();
          resetToLogin("You left the chat.");
        }
        return true;
      }
      case "help": {
        showHelp();
        return true;
      }
      case "topic": {
        if (!view || view.kind !== "room") {
          note("This is not a room.", "error");
          return false;
        }
        if (!rest) {
          const t = view.topic;
          note(t && t.text ? `Topic of ${view.name}: ${t.text} (set by ${t.by})` : `${view.name} has no topic.`, "info");
          return true;
        }
        if (!connected()) return false;
        request("topic", { room: view.name, text: rest });
        return true;
      }
      case "kick": {
        const m = /^(\S+)(?:\s+([\s\S]*))?$/.exec(rest);
        if (!m) return usage("kick");
        if (!view || view.kind !== "room") return usage("kick");
        if (!connected()) return false;
        request("kick", Object.assign({ room: view.name, nick: m[1] }, m[2] && m[2].trim() ? { reason: m[2].trim() } : {}));
        return true;
      }
      case "invite": {
        const m = /^(\S+)(?:\s+(#\S+))?$/.exec(rest);
        const room = m && m[2] ? m[2] : view && view.kind === "room" ? view.name : null;
        if (!m || !room) return usage("invite");
        if (!connected()) return false;
        request("invite", { room, nick: m[1] });
        return true;
      }
      case "ban":
      case "unban":
      case "op":
      case "deop":
      case "voice":
      case "devoice": {
        if (!rest || /\s/.test(rest) || !view || view.kind !== "room") return usage(name);
        return setModes(view, { [name]: [rest] });
      }
      case "mode": {
        if (!view || view.kind !== "room" || !view.joined) {
          note("/mode shows the settings of a room you are in.", "error");
          return false;
        }
        openSettings();
        return true;
      }
      case "register": {
        if (!rest) {
          openRegister();
          return true;
        }
        const problem = passwordProblem(rest);
        if (problem) {
          note(problem, "error");
          return false;
        }
        if (!connected()) return false;
        request("register", { password: rest, remember: true }, { remember: true });
        return true;
      }
      case "login": {
        const m = /^(\S+)\s+(\S[\s\S]*)$/.exec(rest);
        if (!m) return usage("login");
        if (!connected()) return false;
        request("login", { account: m[1], password: m[2], remember: true }, { remember: true });
        return true;
      }
      case "logout": {
        if (!S.account) {
          note("You are not logged in.", "error");
          return false;
        }
        logout();
        return true;
      }
      default:
        note(`Unknown command /${name}: /help lists them; //text says /text.`, "error");
        return false;
    }
  }

  /** The commands and keys as a two-column table (a proportional font cannot align spaces). */
  function showHelp() {
    const view = currentView();
    if (!view) return;
    const table = el("div", "help-table");
    const section = (title, rows) => {
      table.append(el("span", "help-title", title));
      for (const [what, does] of rows) table.append(el("code", null, what), el("span", null, does));
    };
    section("Commands", COMMANDS);
    section("Keys", KEYS);
    table.append(el("span", "help-foot", "A line starting with // is said with one slash: //shrug says /shrug."));
    const line = el("div", "line info help");
    line.append(stamp(line, Date.now()), table);
    appendLine(view, line);
  }

  function onInputSubmit(e) {
    e.preventDefault();
    const line = ui.input.value;
    if (!line.trim()) return;
    const done = runLine(line);
    if (done && !/^\/(register|login)\s/i.test(line)) {
      S.inputHistory.push(line);
    }
    if (done) {
      if (S.inputHistory.length > INPUT_HISTORY_MAX) S.inputHistory.shift();
      S.inputPos = -1;
      ui.input.value = "";
    }
    const view = currentView();
    if (view && done) {
      scrollToBottom(view);
      view.stick = true;
      view.below = 0;
      renderJump();
    }
  }

  // ----- completion and keys ---------------------------------------------------------------

  function completionCandidates(word) {
    const view = currentView();
    if (word.startsWith("/")) return COMMANDS.map(([u]) => u.split(" ")[0]).concat(["/j", "/q"]).filter((c, i, a) => a.indexOf(c) === i);
    if (word.startsWith("#")) return Array.from(S.views.values()).filter((v) => v.kind === "room").map((v) => v.name);
    const out = [];
    if (view && view.kind === "room") out.push(...view.members.values());
    if (view && view.kind === "query") out.push(view.name);
    for (const v of S.views.values()) if (v.kind === "query" && !out.includes(v.name)) out.push(v.name);
    return out.filter((n) => !isMe(n)).sort((a, b) => (fold(a) < fold(b) ? -1 : 1));
  }

  function complete() {
    const input = ui.input;
    const caret = input.selectionStart;
    if (caret !== input.selectionEnd) return false;
    const value = input.value;
    let c = S.completion;
    if (!c || c.value !== value || c.caret !== caret) {
      const start = value.lastIndexOf(" ", caret - 1) + 1;
      const word = value.slice(start, caret);
      if (!word) return false;
      const matches = completionCandidates(word).filter((n) => fold(n).startsWith(fold(word)));
      if (!matches.length) return false;
      c = { start, end: caret, matches, i: -1, suffix: value.slice(caret) };
    }
    c.i = (c.i + 1) % c.matches.length;
    const pick = c.matches[c.i];
    const head = value.slice(0, c.start);
    const isNick = !pick.startsWith("/") && !pick.startsWith("#");
    const after = c.start === 0 && isNick ? ": " : " ";
    const tail = c.suffix.startsWith(" ") ? c.suffix.replace(/^ /, "") : c.suffix;
    input.value = head + pick + after + tail;
    const pos = head.length + pick.length + after.length;
    input.setSelectionRange(pos, pos);
    c.value = input.value;
    c.caret = pos;
    S.completion = c;
    return true;
  }

  function stepView(delta) {
    const order = viewOrder();
    if (!order.length) return;
    const i = order.indexOf(S.current);
    const next = order[(i + delta + order.length) % order.length];
    switchTo(next);
  }

  function nextActive() {
    const order = viewOrder();
    const i = Math.max(0, order.indexOf(S.current));
    const rotated = order.slice(i + 1).concat(order.slice(0, i + 1));
    const pick = rotated.find((k) => S.views.get(k).mention) || rotated.find((k) => S.views.get(k).unread > 0);
    if (pick) switchTo(pick);
  }

  function onInputKey(e) {
    if (e.key === "Tab" && !e.altKey && !e.ctrlKey && !e.metaKey && !e.shiftKey) {
      if (complete()) {
        e.preventDefault();
        return;
      }
      if (ui.input.value) e.preventDefault();
      return;
    }
    S.completion = null;
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const hist = S.inputHistory;
    if (e.key === "ArrowUp" && hist.length && (S.inputPos >= 0 || !ui.input.value)) {
      e.preventDefault();
      S.inputPos = S.inputPos < 0 ? hist.length - 1 : Math.max(0, S.inputPos - 1);
      ui.input.value = hist[S.inputPos];
    } else if (e.key === "ArrowDown" && S.inputPos >= 0) {
      e.preventDefault();
      S.inputPos += 1;
      if (S.inputPos >= hist.length) {
        S.inputPos = -1;
        ui.input.value = "";
      } else {
        ui.input.value = hist[S.inputPos];
      }
    } else if (e.key === "PageUp" || e.key === "PageDown") {
      const view = currentView();
      if (view) {
        e.preventDefault();
        const step = view.log.clientHeight * 0.85;
        view.log.scrollTop += e.key === "PageUp" ? -step : step;
      }
    }
  }

  function onDocumentKey(e) {
    if (ui.app.hidden) return;
    if (e.altKey && !e.ctrlKey && !e.metaKey) {
      if (e.key === "ArrowUp" || e.key === "ArrowDown") {
        e.preventDefault();
        stepView(e.key === "ArrowUp" ? -1 : 1);
        return;
      }
      if (e.code === "KeyA" || e.key === "a" || e.key === "A") {
        e.preventDefault();
        nextActive();
        return;
      }
    }
    if (e.key === "Escape") {
      if (!ui.menu.hidden) {
        closeMemberMenu();
        ui.input.focus();
        return;
      }
      closeDrawers();
    }
  }

  // ----- notifications ---------------------------------------------------------------------

  function setNotify(on) {
    S.notify = on;
    ui.notify.setAttribute("aria-pressed", on ? "true" : "false");
    ui.notify.title = on
      ? "Desktop notifications are on (mentions and private messages). Click to turn off."
      : "Turn on desktop notifications for mentions and private messages";
    try {
      localStorage.setItem(NOTIFY_KEY, on ? "1" : "0");
    } catch (e) {
      /* ignore */
    }
  }

  function onNotifyClick() {
    if (S.notify) {
      setNotify(false);
      return;
    }
    if (!("Notification" in window)) {
      note("This browser cannot show desktop notifications.", "error");
      return;
    }
    if (Notification.permission === "granted") {
      setNotify(true);
      return;
    }
    Notification.requestPermission().then((p) => {
      setNotify(p === "granted");
      if (p !== "granted") note("Notifications were not allowed by the browser.", "error");
    });
  }

  function notifyAbout(view, m) {
    if (!S.notify || !("Notification" in window) || Notification.permission !== "granted") return;
    const from = str(m.from);
    const title = view.kind === "query" ? `${from} (private)` : `${from} in ${view.name}`;
    try {
      const n = new Notification(title, { body: str(m.text).slice(0, 300), tag: "selchat-" + view.key });
      n.addEventListener("click", () => {
        window.focus();
        if (S.views.has(view.key)) switchTo(view.key);
        n.close();
      });
    } catch (e) {
      /* some browsers only notify from a service worker; the badge and title still tell */
    }
  }

  // ----- phone drawers ---------------------------------------------------------------------

  function toggleDrawer(which) {
    const cls = which === "sidebar" ? "show-sidebar" : "show-members";
    const other = which === "sidebar" ? "show-members" : "show-sidebar";
    const on = !ui.app.classList.contains(cls);
    ui.app.classList.remove(other);
    ui.app.classList.toggle(cls, on);
    ui.sidebarToggle.setAttribute("aria-expanded", String(ui.app.classList.contains("show-sidebar")));
    ui.membersToggle.setAttribute("aria-expanded", String(ui.app.classList.contains("show-members")));
    ui.scrim.hidden = !on;
  }

  function closeDrawers() {
    ui.app.classList.remove("show-sidebar", "show-members");
    ui.sidebarToggle.setAttribute("aria-expanded", "false");
    ui.membersToggle.setAttribute("aria-expanded", "false");
    ui.scrim.hidden = true;
  }

  // ----- start -----------------------------------------------------------------------------

  function start() {
    Object.assign(ui, {
      login: $("login"),
      loginForm: $("login-form"),
      nickInput: $("login-nick"),
      passwordRow: $("login-password-row"),
      password: $("login-password"),
      loginButton: $("login-button"),
      loginError: $("login-error"),
      loginState: $("login-state"),
      app: $("app"),
      title: $("view-title"),
      info: $("view-info"),
      conn: $("conn"),
      notify: $("toggle-notify"),
      sidebarToggle: $("toggle-sidebar"),
      membersToggle: $("toggle-members"),
      roomList: $("room-list"),
      queryList: $("query-list"),
      meNick: $("me-nick"),
      logs: $("logs"),
      input: $("input"),
      inputForm: $("input-form"),
      inputNick: $("input-nick"),
      memberList: $("member-list"),
      memberCount: $("member-count"),
      scrim: $("scrim"),
      jump: $("jump"),
      loginTabs: Array.from(document.querySelectorAll(".login-tabs [data-mode]")),
      nickLabel: $("login-nick-label"),
      secretRow: $("login-secret-row"),
      secretLabel: $("login-secret-label"),
      secret: $("login-secret"),
      remember: $("login-remember"),
      meAccount: $("me-account"),
      registerOpen: $("register-open"),
      logout: $("logout"),
      settingsToggle: $("toggle-settings"),
      topic: $("topic"),
      topicText: $("topic-text"),
      topicForm: $("topic-form"),
      topicInput: $("topic-input"),
      menu: $("member-menu"),
      menuNick: $("menu-nick"),
      menuInfo: $("menu-info"),
      menuOps: $("menu-ops"),
      menuReason: $("menu-reason"),
      settings: $("settings"),
      settingsTitle: $("settings-title"),
      settingsNote: $("settings-note"),
      modeKey: $("mode-key"),
      modeKeySet: $("mode-key-set"),
      modeLimit: $("mode-limit"),
      modeLimitSet: $("mode-limit-set"),
      banList: $("ban-list"),
      banMask: $("ban-mask"),
      banAdd: $("ban-add"),
      registerPanel: $("register-panel"),
      registerForm: $("register-form"),
      registerNick: $("register-nick"),
      registerPassword: $("register-password"),
      registerRemember: $("register-remember"),
      registerError: $("register-error"),
    });
    for (const tab of ui.loginTabs) {
      tab.addEventListener("click", () => {
        setLoginMode(tab.dataset.mode);
        ui.nickInput.focus();
      });
    }
    ui.registerOpen.addEventListener("click", openRegister);
    ui.registerForm.addEventListener("submit", onRegisterSubmit);
    $("register-cancel").addEventListener("click", () => ui.registerPanel.close());
    ui.logout.addEventListener("click", logout);
    ui.settingsToggle.addEventListener("click", openSettings);
    // Back to the message input when a panel closes. The caret has to be put there too:
    // Chromium leaves the selection in the panel's text field it was in, and typing then
    // goes nowhere although the input has the focus.
    const backToInput = () => {
      ui.input.focus();
      const n = ui.input.value.length;
      ui.input.setSelectionRange(n, n);
    };
    ui.settings.addEventListener("close", backToInput);
    ui.registerPanel.addEventListener("close", backToInput);
    for (const box of ui.settings.querySelectorAll("input[data-mode]")) {
      box.addEventListener("change", () => {
        const v = settingsView();
        if (v) setModes(v, { [box.dataset.mode]: box.checked });
      });
    }
    ui.modeKeySet.addEventListener("click", () => {
      const v = settingsView();
      const key = ui.modeKey.value.trim();
      if (v) setModes(v, { key: key || null });
    });
    ui.modeLimitSet.addEventListener("click", () => {
      const v = settingsView();
      const n = Number(ui.modeLimit.value);
      if (v) setModes(v, { limit: ui.modeLimit.value.trim() && Number.isInteger(n) && n >= 1 ? n : null });
    });
    const addBan = () => {
      const v = settingsView();
      const mask = ui.banMask.value.trim();
      if (v && mask && setModes(v, { ban: [mask] })) ui.banMask.value = "";
    };
    ui.banAdd.addEventListener("click", addBan);
    ui.banMask.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        addBan();
      }
    });
    ui.topicText.addEventListener("click", editTopic);
    ui.topicForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const view = currentView();
      if (view && view.kind === "room" && connected()) request("topic", { room: view.name, text: ui.topicInput.value.trim() });
      endTopicEdit();
    });
    ui.topicInput.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        endTopicEdit();
      }
    });
    ui.topicInput.addEventListener("blur", () => {
      if (!ui.topicForm.hidden) {
        ui.topicForm.hidden = true;
        ui.topicText.hidden = false;
      }
    });
    ui.menu.addEventListener("click", onMenuClick);
    ui.menuReason.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        const kick = ui.menu.querySelector('[data-act="kick"]');
        if (kick && !kick.hidden) kick.click();
      }
    });
    document.addEventListener("mousedown", (e) => {
      if (!ui.menu.hidden && !ui.menu.contains(e.target) && !e.target.closest("#member-list li")) closeMemberMenu();
    });
    ui.jump.addEventListener("click", () => {
      const v = currentView();
      if (v) {
        scrollToBottom(v);
        v.stick = true;
        v.below = 0;
      }
      renderJump();
      ui.input.focus();
    });
    ui.loginForm.addEventListener("submit", onLoginSubmit);
    ui.inputForm.addEventListener("submit", onInputSubmit);
    ui.input.addEventListener("keydown", onInputKey);
    document.addEventListener("keydown", onDocumentKey);
    ui.notify.addEventListener("click", onNotifyClick);
    ui.sidebarToggle.addEventListener("click", () => toggleDrawer("sidebar"));
    ui.membersToggle.addEventListener("click", () => toggleDrawer("members"));
    ui.scrim.addEventListener("click", closeDrawers);
    ui.memberList.addEventListener("click", (e) => {
      const li = e.target.closest("li[data-nick]");
      if (!li) return;
      if (!ui.menu.hidden && ui.menu.dataset.nick === li.dataset.nick) closeMemberMenu();
      else openMemberMenu(li);
    });
    ui.memberList.addEventListener("keydown", (e) => {
      const li = e.target.closest("li[data-nick]");
      if (li && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        openMemberMenu(li);
      }
    });
    ui.conn.addEventListener("click", retryNow);
    window.addEventListener("online", retryNow);
    const seen = () => {
      const v = currentView();
      if (v && !document.hidden) markRead(v);
    };
    document.addEventListener("visibilitychange", () => {
      seen();
      if (!document.hidden) retryNow();
    });
    window.addEventListener("focus", seen);
    try {
      setNotify(localStorage.getItem(NOTIFY_KEY) === "1" && "Notification" in window && Notification.permission === "granted");
      const saved = localStorage.getItem(NICK_KEY);
      if (saved && !ui.nickInput.value) ui.nickInput.value = saved;
    } catch (e) {
      setNotify(false);
    }
    window.addEventListener("pagehide", saveSession);
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) saveSession();
    });
    updateTitle();
    const saved = loadToken();
    if (saved) {
      S.account = saved.account;
      S.token = saved.token;
      S.tokenRemember = saved.remember;
      S.remember = saved.remember;
    }
    renderAccount();
    if (restoreSession()) return;
    ui.nickInput.focus();
    ui.nickInput.select();
    if (saved) {
      // Logged in on this device before: in again with the token, no form to fill.
      let nick = saved.account;
      try {
        nick = localStorage.getItem(NICK_KEY) || nick;
      } catch (e) {
        /* ignore */
      }
      if (nickProblem(nick)) nick = saved.account;
      S.nick = nick;
      ui.nickInput.value = nick;
      ui.loginButton.disabled = true;
      ui.loginState.textContent = `Logging in as ${saved.account}...`;
      connect();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
