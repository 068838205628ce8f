/* selchat-bench's C load generator: one process, one epoll loop, never the bottleneck.
 *
 * Why it exists: the Python generator costs about as much CPU per delivery as the servers it
 * measures, so on a two-core machine a fast server (InspIRCd at 100 receivers) was measured
 * at the generator's speed. This program does the same fan-out workload at a small fraction
 * of a server's cost per delivery, so that the server, pinned to the other core, is the limit.
 *
 * The workload is the Python generator's (selchat/bench/worker.py, ircload.py), byte for byte:
 *   native: 4-byte big-endian length + JSON. `hello` as Python's json.dumps writes it; every
 *           newcomer is in #lobby; `say` {"type":"say","room":"#lobby","text":"~@..."}.
 *   irc:    NICK/USER, wait for 001, JOIN #lobby, wait for 366; PRIVMSG #lobby :~@...
 * A text is `~@`, one sender-id byte, 16 digits of send time (CLOCK_MONOTONIC microseconds),
 * then `x` up to --msg-size characters. R receivers and S senders; each sender keeps at most
 * --window messages in flight: native senders count their own echoes, IRC senders (IRC does
 * not echo) are credited by one receiver each, a "counter", picked evenly across receivers.
 *
 * Phases: connect (ramped, at most --max-pending between connect and registration) and
 * register; settle (read until quiet); load: send from t_send, open the measured window
 * after --warmup, close it after --duration, stop sending, drain until quiet; then check that
 * every member got every message (IRC: all but its own) and print one JSON result line.
 * The window's edges are announced on stdout as {"event":"start"} and {"event":"end"} (the
 * runner samples the server's /proc there). Everything is bounded: every phase has a
 * deadline, and alarm() ends the process if the whole run overstays its budget.
 *
 * TCP_QUICKACK (--quickack window, the default): the members that drive the window (native
 * senders, IRC counters) ask the kernel to acknowledge at once after every receive. A server
 * that does not set TCP_NODELAY (InspIRCd 3 sets no socket option on its clients) holds a
 * small write until the previous one is acknowledged, and Linux delays the ACK of a socket
 * that only receives by up to 40 ms: the window then refills at the pace of the ACK timer,
 * not of the server. Other receivers acknowledge like any client ("all" and "none" exist).
 *
 * Bulk receivers: during the load, the receivers that are neither counters nor one of
 * --probes (10) picked evenly are read every --bulk-ms (R/100 ms, within 1..20 ms) rather
 * than on every pass, so that one receive carries many messages (fewer system calls and
 * window updates per delivery); senders, counters and probes are read as soon as data comes.
 *
 * Latency: every --sample-every-th message a sender, counter or probe receives inside the
 * window, send time to the moment its receive returned, into a histogram of 10 us buckets.
 *
 * Rate mode (--rate N > 0; 0, the default, is the window mode above): the senders together
 * offer N messages a second whatever the server does, the shape of a latency measurement
 * rather than of a throughput one. No window and no top-ups: message k of the run is due at
 * t_send + k/N and goes to the senders in round robin (one not READY is passed over; a sender
 * with 64 KiB unsent skips its turn, counted as rate_skipped), stamped when it is written;
 * every epoll wait ends by the next due time, so the pacing holds within a millisecond and a
 * late pass catches up at once (each message still carries its real send time). Every
 * message a sender, counter or probe receives inside the window is timed (--sample-every 1
 * unless given). The result line says "rate" (0 in window mode).
 *
 * Loopback only (the host must be 127.x.y.z). Build: cc -O2 -std=c99 -o cgen loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 65536u
#define RB_SIZE (1u << 18)          /* one receive */
#define MAX_TAIL (MAX_FRAME + 4)    /* an incomplete frame or line kept between receives */
#define MAX_OUT (1u << 20)          /* a connection's unsent bytes before it counts as broken */
#define MAX_EVENTS 1024
#define TS_DIGITS 16
#define TEXT_HEAD (2 + 1 + TS_DIGITS)
#define HIST_BUCKETS 1000000        /* latency histogram: 10 us buckets up to 10 s */
#define HIST_STEP_US 10
#define MAX_CONNS 100000
#define MAX_ERR_KINDS 32

static const char SID_ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

enum { P_NATIVE, P_IRC };
enum { CONNECTING, HELLO, READY, DEAD };

struct conn {
    int fd;
    int state;
    int sid;        /* sender index, -1 for a receiver */
    int counts_for; /* IRC: the sender this receiver credits, -1 if none */
    unsigned char own; /* the id byte whose lines this member counts as "mine" (0: none) */
    int writing;
    int bulk;       /* read every --bulk-ms during the load (not a sender, counter or probe) */
    char nick[16];
    unsigned char *tail;
    uint32_t tail_len;
    unsigned char *out;
    uint32_t out_len, out_cap;
    uint64_t msgs, msgs0, lines, bytes;
    uint64_t sent, echoes;
    uint32_t countdown;
    int32_t rel;       /* learned offset of the marker (native: in a frame of rel_len bytes; IRC: in a line) */
    uint32_t rel_len;  /* native: frame length; IRC: line length including the newline */
    double t_open;
};

/* ---- options ------------------------------------------------------------------------ */
static struct {
    char host[64];
    int port;
    int proto;
    int receivers, senders, window, msg_size;
    double duration, warmup, ramp_rate, register_timeout, settle_quiet, drain_timeout, drain_quiet;
    int max_pending;
    int sample_every;
    int cpu;
    char channel[64];
    int quickack;
    long messages; /* per sender, 0: no limit (the tests count exactly) */
    double bulk_ms; /* < 0: from R */
    int probes;
    double rate;    /* messages/s over all senders; 0: window mode */
} opt = {
    "127.0.0.1", 0, P_NATIVE, 100, 10, 8, 100,
    5.0, 1.0, 2000.0, 60.0, 0.3, 10.0, 0.3,
    256, -1, -1, "#lobby", 1, 0, -1.0, 10, 0.0,
};

/* ---- state -------------------------------------------------------------------------- */
static struct conn *conns;
static int nconns;
static int *sender_idx;       /* sender k -> its index in conns */
static struct conn **by_fd;   /* fd -> conn */
static int by_fd_len;
static int ep;                /* senders, counters, probes; the bulk set's fd when it is read every pass */
static int ep_bulk;           /* the other receivers */
static int bulk_nested;       /* ep_bulk is in ep: bulk receivers are read on every pass */
static double bulk_interval, next_bulk;
static unsigned char *rb;
static double now_s;          /* CLOCK_MONOTONIC seconds of the current pass */
static double last_rx;
static struct sockaddr_in addr;
static uint32_t *hist;
static uint64_t hist_n, hist_over, lat_max_us;
static int sampling;
static int sending;
static uint64_t total_msgs, total_lines, total_bytes, total_sent, total_recvs, total_polls;
static int pending, opened, reg_ok, reg_failed, dropped;
static double t_first_connect, t_last_ready;
static char err_name[MAX_ERR_KINDS][40];
static uint64_t err_count[MAX_ERR_KINDS];
static int n_err;
static unsigned char say_head[128];
static size_t say_head_len;
static unsigned char *say_tail;
static size_t say_tail_len;
static double rate_t0;        /* rate mode: message k is due at rate_t0 + k / rate */
static uint64_t rate_k;       /* messages due so far (sent or skipped) */
static int rate_next;         /* the sender whose turn it is */
static int rate_done;         /* every READY sender has sent its --messages */
#define RATE_MAX_UNSENT 65536u /* a sender with this much unsent skips its turn */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

static void count_error(const char *name) {
    for (int i = 0; i < n_err; i++)
        if (strcmp(err_name[i], name) == 0) {
            err_count[i]++;
            return;
        }
    if (n_err < MAX_ERR_KINDS) {
        snprintf(err_name[n_err], sizeof err_name[n_err], "%s", name);
        err_count[n_err++] = 1;
    }
}

static void die(const char *msg) {
    /* a usage or setup error: still one JSON line, so the runner can say what went wrong */
    printf("{\"event\":\"result\",\"ok\":false,\"error\":\"%s\"}\n", msg);
    fflush(stdout);
    exit(2);
}

/* ---- connections -------------------------------------------------------------------- */
static void close_conn(struct conn *c) {
    if (c->state == DEAD)
        return;
    c->state = DEAD;
    epoll_ctl(c->bulk ? ep_bulk : ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void fail(struct conn *c, const char *why) {
    if (c->state == CONNECTING || c->state == HELLO) {
        pending--;
        reg_failed++;
    } else if (c->state == READY) {
        dropped++;
    }
    count_error(why);
    close_conn(c);
}

static void set_events(struct conn *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data = {.fd = c->fd}};
    epoll_ctl(c->bulk ? ep_bulk : ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void flush(struct conn *c) {
    if (c->state == DEAD)
        return;
    while (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            fail(c, "send_failed");
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (uint32_t)n);
        c->out_len -= (uint32_t)n;
    }
    int want = c->out_len > 0;
    if (want != c->writing) {
        c->writing = want;
        set_events(c, want ? EPOLLIN | EPOLLOUT : EPOLLIN);
    }
}

static int append(struct conn *c, const void *data, size_t n) {
    if (c->out_len + n > MAX_OUT) {
        fail(c, "output_overflow");
        return -1;
    }
    if (c->out_len + n > c->out_cap) {
        uint32_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n)
            cap *= 2;
        unsigned char *p = realloc(c->out, cap);
        if (!p) {
            fail(c, "out_of_memory");
            return -1;
        }
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += (uint32_t)n;
    return 0;
}

static void open_conn(struct conn *c) {
    opened++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_error("socket_failed");
        reg_failed++;
        c->state = DEAD;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!t_first_connect)
        t_first_connect = now_s;
    c->t_open = now_s;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        count_error("connect_failed");
        reg_failed++;
        close(fd);
        c->state = DEAD;
        return;
    }
    if (fd >= by_fd_len) {
        int len = by_fd_len ? by_fd_len : 1024;
        while (len <= fd)
            len *= 2;
        struct conn **p = realloc(by_fd, (size_t)len * sizeof *p);
        if (!p)
            die("out of memory");
        memset(p + by_fd_len, 0, (size_t)(len - by_fd_len) * sizeof *p);
        by_fd = p;
        by_fd_len = len;
    }
    by_fd[fd] = c;
    c->fd = fd;
    c->state = CONNECTING;
    pending++;
    struct epoll_event e = {.events = EPOLLOUT, .data = {.fd = fd}};
    epoll_ctl(c->bulk ? ep_bulk : ep, EPOLL_CTL_ADD, fd, &e);
}

static void ready(struct conn *c) {
    c->state = READY;
    pending--;
    reg_ok++;
    t_last_ready = now_s;
}

static void connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(c, err == ECONNREFUSED ? "ECONNREFUSED" : "connect_error");
        return;
    }
    c->state = HELLO;
    char buf[256];
    int n;
    if (opt.proto == P_NATIVE) {
        /* what Python's json.dumps({"type": "hello", "nick": ..., "client": "selchat-bench"}) writes */
        n = snprintf(buf + 4, sizeof buf - 4, "{\"type\": \"hello\", \"nick\": \"%s\", \"client\": \"selchat-bench\"}", c->nick);
        buf[0] = 0; buf[1] = 0; buf[2] = (char)(n >> 8); buf[3] = (char)n;
        n += 4;
    } else {
        n = snprintf(buf, sizeof buf, "NICK %s\r\nUSER u 0 * :selchat-bench\r\n", c->nick);
    }
    c->writing = 1; /* EPOLLOUT is set: flush() turns it off */
    if (append(c, buf, (size_t)n) == 0)
        flush(c);
}

/* ---- sending -------------------------------------------------------------------------- */
static void put_ts(unsigned char *p, uint64_t v) {
    for (int i = TS_DIGITS - 1; i >= 0; i--) {
        p[i] = (unsigned char)('0' + v % 10);
        v /= 10;
    }
}

/* one say of sender c into msg, stamped now; its length */
static size_t build_say(const struct conn *c, unsigned char *msg) {
    size_t len = 0;
    size_t body = say_head_len + 1 + TS_DIGITS + say_tail_len;
    if (opt.proto == P_NATIVE) {
        msg[0] = 0; msg[1] = 0; msg[2] = (unsigned char)(body >> 8); msg[3] = (unsigned char)body;
        len = 4;
    }
    memcpy(msg + len, say_head, say_head_len);
    len += say_head_len;
    msg[len++] = (unsigned char)SID_ALPHABET[c->sid];
    put_ts(msg + len, mono_us());
    len += TS_DIGITS;
    memcpy(msg + len, say_tail, say_tail_len);
    len += say_tail_len;
    return len;
}

static void top_up(struct conn *c) {
    if (c->state != READY)
        return;
    int64_t n = (int64_t)opt.window - (int64_t)(c->sent - c->echoes);
    if (opt.messages && n > opt.messages - (int64_t)c->sent)
        n = opt.messages - (int64_t)c->sent;
    if (n <= 0)
        return;
    unsigned char msg[8192];
    size_t len = build_say(c, msg);
    for (int64_t i = 0; i < n; i++)
        if (append(c, msg, len) < 0)
            return;
    c->sent += (uint64_t)n;
    total_sent += (uint64_t)n;
    flush(c);
}

/* rate mode: the sender whose turn it is, passing over any not READY or done with its
 * --messages; NULL when there is none (rate_done when some are READY but all are done) */
static struct conn *rate_sender(void) {
    int alive = 0;
    for (int i = 0; i < opt.senders; i++) {
        int s = (rate_next + i) % opt.senders;
        struct conn *c = &conns[sender_idx[s]];
        if (c->state != READY)
            continue;
        alive = 1;
        if (opt.messages && c->sent >= (uint64_t)opt.messages)
            continue;
        rate_next = (s + 1) % opt.senders;
        return c;
    }
    if (alive)
        rate_done = 1;
    return NULL;
}

/* rate mode: send every message due by now, each stamped as it is written */
static void paced_sends(void) {
    double now = mono();
    unsigned char msg[8192];
    while (!rate_done && rate_t0 + (double)rate_k / opt.rate <= now) {
        rate_k++;
        struct conn *c = rate_sender();
        if (!c) {
            if (!rate_done)
                count_error("rate_no_sender");
            continue;
        }
        if (c->out_len >= RATE_MAX_UNSENT) {
            count_error("rate_skipped");
            continue;
        }
        size_t len = build_say(c, msg);
        if (append(c, msg, len) < 0)
            continue;
        c->sent++;
        total_sent++;
        flush(c);
    }
}

/* rate mode: milliseconds until the next message is due (rounded up) */
static int ms_until_due(void) {
    double d = (rate_t0 + (double)rate_k / opt.rate - mono()) * 1000.0;
    if (d <= 0)
        return 0;
    return d > 100 ? 100 : (int)(d + 0.999);
}

/* ---- receiving: shared ------------------------------------------------------------------ */
static inline void sample(struct conn *c, const unsigned char *ts, uint64_t t_us) {
    if (--c->countdown)
        return;
    c->countdown = (uint32_t)opt.sample_every;
    uint64_t v = 0;
    for (int i = 0; i < TS_DIGITS; i++)
        v = v * 10 + (uint64_t)(ts[i] - '0');
    uint64_t lat = t_us > v ? t_us - v : 0;
    if (lat > lat_max_us)
        lat_max_us = lat;
    uint64_t b = lat / HIST_STEP_US;
    if (b >= HIST_BUCKETS) {
        hist_over++;
    } else {
        hist[b]++;
    }
    hist_n++;
}

/* A counted message: `sid` is its sender-id byte; credits the window of its sender when
 * this member counts for it (native: its own echo; IRC: the designated counter). The sender
 * is topped up once the whole receive is read (one write for all it may send), as the
 * Python generator does. */
static struct conn *credited;

static inline void credit(struct conn *c, unsigned char sid) {
    if (sid != c->own)
        return;
    struct conn *s = c->sid >= 0 ? c : &conns[sender_idx[c->counts_for]];
    s->echoes++;
    credited = s;
}

static void keep_tail(struct conn *c, const unsigned char *p, size_t n) {
    if (n > MAX_TAIL) {
        fail(c, opt.proto == P_IRC ? "line_too_long" : "bad_frame");
        return;
    }
    if (n && !c->tail) {
        c->tail = malloc(MAX_TAIL);
        if (!c->tail)
            die("out of memory");
    }
    if (n)
        memmove(c->tail, p, n);
    c->tail_len = (uint32_t)n;
}

/* ---- native ------------------------------------------------------------------------- */
static const unsigned char *find(const unsigned char *p, size_t n, const char *s) {
    return memmem(p, n, s, strlen(s));
}

static void native_control(struct conn *c, const unsigned char *p, uint32_t len) {
    /* a frame that is not a benchmark message: registration answers, errors, pings */
    const unsigned char *t = find(p, len < 40 ? len : 40, "\"type\":\"");
    if (!t)
        return;
    t += 8;
    size_t left = len - (size_t)(t - p);
    if (c->state == HELLO && left >= 8 && memcmp(t, "welcome\"", 8) == 0) {
        ready(c);
    } else if (left >= 5 && memcmp(t, "ping\"", 5) == 0) {
        /* answer with the same frame, "ping" turned into "pong" (the token comes back as sent) */
        unsigned char hdr[4] = {0, 0, (unsigned char)(len >> 8), (unsigned char)len};
        if (len > 0xffff || append(c, hdr, 4) < 0)
            return;
        size_t at = c->out_len;
        if (append(c, p, len) < 0)
            return;
        c->out[at + (size_t)(t - p) + 1] = 'o';
        flush(c);
    } else if (left >= 6 && memcmp(t, "error\"", 6) == 0) {
        char why[40] = "error";
        const unsigned char *k = find(p, len, "\"code\":\"");
        if (k) {
            k += 8;
            const unsigned char *e = memchr(k, '"', len - (size_t)(k - p));
            if (e && e - k < 30)
                snprintf(why, sizeof why, "%.*s", (int)(e - k), (const char *)k);
        }
        if (c->state == HELLO)
            fail(c, why);
        else
            count_error(why);
    }
}

static size_t native_read(struct conn *c, const unsigned char *buf, size_t end) {
    size_t off = 0;
    uint64_t t_us = sampling ? mono_us() : 0;
    uint64_t msgs = 0;
    while (end - off >= 4) {
        uint32_t len = (uint32_t)buf[off] << 24 | (uint32_t)buf[off + 1] << 16 | (uint32_t)buf[off + 2] << 8 | buf[off + 3];
        if (len == 0 || len > MAX_FRAME) {
            fail(c, "bad_frame");
            return end;
        }
        if (end - off - 4 < len)
            break;
        const unsigned char *p = buf + off + 4;
        off += 4 + (size_t)len;
        int32_t r = -1;
        if (c->state == READY) {
            if (len == c->rel_len && p[c->rel] == '~' && p[c->rel + 1] == '@') {
                r = c->rel;
            } else {
                const unsigned char *q = memmem(p, len, "~@", 2);
                if (q && (size_t)(q - p) + TEXT_HEAD <= len) {
                    r = (int32_t)(q - p);
                    c->rel = r;
                    c->rel_len = len;
                }
            }
        }
        if (r >= 0) {
            msgs++;
            if (sampling && !c->bulk)
                sample(c, p + r + 3, t_us);
            if (c->own)
                credit(c, p[r + 2]);
        } else {
            native_control(c, p, len);
            if (c->state == DEAD)
                return end;
        }
    }
    c->msgs += msgs;
    total_msgs += msgs;
    return off;
}

/* ---- IRC ---------------------------------------------------------------------------- */
static int irc_word(const unsigned char **p, const unsigned char *e, const unsigned char **w, size_t *wn) {
    while (*p < e && **p == ' ')
        (*p)++;
    if (*p >= e)
        return 0;
    *w = *p;
    while (*p < e && **p != ' ')
        (*p)++;
    *wn = (size_t)(*p - *w);
    return 1;
}

static void irc_control(struct conn *c, const unsigned char *line, size_t n) {
    /* one complete line that is not a benchmark message (n excludes the newline) */
    if (n && line[n - 1] == '\r')
        n--;
    const unsigned char *p = line, *e = line + n, *w;
    size_t wn;
    if (p < e && *p == ':')
        irc_word(&p, e, &w, &wn); /* the prefix */
    if (!irc_word(&p, e, &w, &wn))
        return;
    if (wn == 4 && memcmp(w, "PING", 4) == 0) {
        if (append(c, "PONG", 4) == 0 && append(c, p, (size_t)(e - p)) == 0 && append(c, "\r\n", 2) == 0)
            flush(c);
    } else if (wn == 5 && memcmp(w, "ERROR", 5) == 0) {
        count_error("irc_error");
    } else if (c->state == HELLO && wn == 3) {
        if (memcmp(w, "001", 3) == 0) {
            char buf[96];
            int k = snprintf(buf, sizeof buf, "JOIN %s\r\n", opt.channel);
            if (append(c, buf, (size_t)k) == 0)
                flush(c);
        } else if (memcmp(w, "366", 3) == 0) {
            /* :server 366 <nick> <channel> :End of /NAMES list. */
            const unsigned char *nick, *chan;
            size_t nn, cn;
            if (irc_word(&p, e, &nick, &nn) && irc_word(&p, e, &chan, &cn) && cn == strlen(opt.channel)
                && strncasecmp((const char *)chan, opt.channel, cn) == 0)
                ready(c);
        } else {
            static const char *fatal[] = {"431", "432", "433", "436", "437", "403", "405", "465", "471", "473", "474", "475"};
            for (size_t i = 0; i < sizeof fatal / sizeof *fatal; i++)
                if (memcmp(w, fatal[i], 3) == 0) {
                    char why[16];
                    snprintf(why, sizeof why, "irc_%.3s", (const char *)w);
                    fail(c, why);
                    return;
                }
        }
    }
}

static size_t irc_read(struct conn *c, const unsigned char *buf, size_t end) {
    size_t off = 0;
    uint64_t t_us = sampling ? mono_us() : 0;
    uint64_t msgs = 0, lines = 0;
    while (off < end) {
        const unsigned char *p = buf + off;
        size_t left = end - off;
        size_t step;
        int32_t r = -1;
        /* fast path: a line of the learned length with the marker at the learned offset */
        if (c->rel_len && left >= c->rel_len && p[c->rel_len - 1] == '\n' && p[c->rel] == ' ' && p[c->rel + 1] == ':'
            && p[c->rel + 2] == '~' && p[c->rel + 3] == '@' && !memchr(p, '\n', (size_t)c->rel)) {
            step = c->rel_len;
            r = c->rel;
        } else {
            const unsigned char *nl = memchr(p, '\n', left);
            if (!nl)
                break;
            step = (size_t)(nl - p) + 1;
            if (c->state == READY) {
                const unsigned char *q = memmem(p, step, " :~@", 4);
                if (q && (size_t)(q - p) + 4 + 1 + TS_DIGITS < step) {
                    r = (int32_t)(q - p);
                    c->rel = r;
                    c->rel_len = (uint32_t)step;
                }
            }
        }
        off += step;
        lines++;
        if (r >= 0) {
            msgs++;
            if (sampling && !c->bulk)
                sample(c, p + r + 5, t_us);
            if (c->own)
                credit(c, p[r + 4]);
        } else {
            irc_control(c, p, step - 1);
            if (c->state == DEAD)
                return end;
        }
    }
    c->msgs += msgs;
    c->lines += lines;
    total_msgs += msgs;
    total_lines += lines;
    return off;
}

static void read_conn(struct conn *c) {
    size_t k = c->tail_len;
    if (k)
        memcpy(rb, c->tail, k);
    ssize_t n;
    do {
        n = recv(c->fd, rb + k, RB_SIZE, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            fail(c, "closed_by_server");
        return;
    }
    if (n == 0) {
        fail(c, "closed_by_server");
        return;
    }
    if (opt.quickack == 2 || (opt.quickack == 1 && c->own)) {
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    }
    last_rx = now_s;
    total_recvs++;
    c->bytes += (uint64_t)n;
    total_bytes += (uint64_t)n;
    size_t end = k + (size_t)n;
    credited = NULL;
    size_t used = opt.proto == P_NATIVE ? native_read(c, rb, end) : irc_read(c, rb, end);
    if (c->state != DEAD)
        keep_tail(c, rb + used, end - used);
    if (credited && sending && opt.rate <= 0)
        top_up(credited);
}

/* ---- phases ------------------------------------------------------------------------- */
struct snap {
    double t, cpu;
    uint64_t msgs, sent, lines, bytes, recvs, polls;
};

static struct snap take_snap(void) {
    struct snap s = {mono(), cpu_seconds(), total_msgs, total_sent, total_lines, total_bytes, total_recvs, total_polls};
    return s;
}

static void run_bulk(void);

static void handle(struct epoll_event *evs, int n) {
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        if (fd == ep_bulk) {
            run_bulk();
            continue;
        }
        struct conn *c = fd < by_fd_len ? by_fd[fd] : NULL;
        if (!c || c->state == DEAD || c->fd != fd)
            continue;
        uint32_t ev = evs[i].events;
        if (c->state == CONNECTING) {
            connected(c);
            continue;
        }
        if (ev & EPOLLOUT)
            flush(c);
        if ((ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) && c->state != DEAD)
            read_conn(c);
    }
}

static void run_bulk(void) {
    /* every ready bulk receiver, one receive each */
    static struct epoll_event evs[MAX_EVENTS];
    int n;
    do {
        n = epoll_wait(ep_bulk, evs, MAX_EVENTS, 0);
        handle(evs, n);
    } while (n == MAX_EVENTS);
}

static void bulk_every_pass(int yes) {
    /* load: the bulk receivers are read every bulk_interval, so that one receive carries many
       messages; otherwise (registration, settling, drain) on every pass, like the others */
    if (yes == bulk_nested)
        return;
    struct epoll_event e = {.events = EPOLLIN, .data = {.fd = ep_bulk}};
    epoll_ctl(ep, yes ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, ep_bulk, &e);
    bulk_nested = yes;
}

static int poll_once(int timeout_ms) {
    static struct epoll_event evs[MAX_EVENTS];
    if (sending && opt.rate > 0 && !rate_done) {
        paced_sends();
        int until = ms_until_due();
        if (until < timeout_ms)
            timeout_ms = until;
    }
    if (!bulk_nested) {
        int until = (int)((next_bulk - mono()) * 1000.0 + 0.999);
        if (until < timeout_ms)
            timeout_ms = until < 0 ? 0 : until;
    }
    int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
    total_polls++;
    now_s = mono();
    handle(evs, n);
    if (!bulk_nested && now_s >= next_bulk) {
        run_bulk();
        next_bulk = now_s + bulk_interval;
    }
    return n;
}

static int ms_until(double t) {
    double d = (t - mono()) * 1000.0;
    if (d <= 0)
        return 0;
    return d > 100 ? 100 : (int)d + 1;
}

static void print_result(int ok, const char *error, double register_s, const struct snap *a, const struct snap *b) {
    uint64_t lost = 0, extra = 0, members = 0, received = 0;
    uint64_t per_min = UINT64_MAX, per_max = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        uint64_t got = c->msgs - c->msgs0 + (opt.proto == P_IRC && c->sid >= 0 ? c->sent : 0);
        members++;
        received += c->msgs - c->msgs0;
        if (got < total_sent)
            lost += total_sent - got;
        else
            extra += got - total_sent;
        if (got < per_min)
            per_min = got;
        if (got > per_max)
            per_max = got;
    }
    double span = b->t - a->t > 1e-9 ? b->t - a->t : 1e-9;
    double p50 = -1, p99 = -1;
    if (hist_n) {
        uint64_t want50 = (uint64_t)(0.50 * (double)(hist_n - 1)) + 1, want99 = (uint64_t)(0.99 * (double)(hist_n - 1)) + 1;
        uint64_t acc = 0;
        for (uint32_t i = 0; i < HIST_BUCKETS; i++) {
            acc += hist[i];
            if (p50 < 0 && acc >= want50)
                p50 = (i + 0.5) * HIST_STEP_US / 1000.0;
            if (p99 < 0 && acc >= want99) {
                p99 = (i + 0.5) * HIST_STEP_US / 1000.0;
                break;
            }
        }
        if (p50 < 0)
            p50 = HIST_BUCKETS * (double)HIST_STEP_US / 1000.0;
        if (p99 < 0)
            p99 = HIST_BUCKETS * (double)HIST_STEP_US / 1000.0;
    }
    printf("{\"event\":\"result\",\"ok\":%s", ok ? "true" : "false");
    if (error)
        printf(",\"error\":\"%s\"", error);
    printf(",\"generator\":\"c\",\"protocol\":\"%s\",\"receivers\":%d,\"senders\":%d,\"window\":%d,\"msg_size\":%d",
           opt.proto == P_IRC ? "irc" : "native", opt.receivers, opt.senders, opt.window, opt.msg_size);
    printf(",\"rate\":%.3f,\"sample_every\":%d", opt.rate, opt.sample_every);
    printf(",\"registered\":%d,\"register_s\":%.3f,\"duration\":%.4f", reg_ok, register_s, span);
    printf(",\"deliveries\":%llu,\"deliveries_per_s\":%.1f,\"sent_per_s\":%.1f",
           (unsigned long long)(b->msgs - a->msgs), (double)(b->msgs - a->msgs) / span, (double)(b->sent - a->sent) / span);
    printf(",\"lines_per_s\":%.1f,\"rx_bytes_per_s\":%.1f", (double)(b->lines - a->lines) / span, (double)(b->bytes - a->bytes) / span);
    printf(",\"gen_cpu\":%.4f,\"recvs_per_s\":%.1f,\"polls_per_s\":%.1f", (b->cpu - a->cpu) / span,
           (double)(b->recvs - a->recvs) / span, (double)(b->polls - a->polls) / span);
    if (hist_n)
        printf(",\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f", p50, p99, lat_max_us / 1000.0);
    else
        printf(",\"p50_ms\":null,\"p99_ms\":null,\"max_ms\":null");
    printf(",\"samples\":%llu,\"sent_total\":%llu,\"members\":%llu,\"lost\":%llu,\"extra\":%llu",
           (unsigned long long)hist_n, (unsigned long long)total_sent, (unsigned long long)members,
           (unsigned long long)lost, (unsigned long long)extra);
    printf(",\"per_member_min\":%llu,\"per_member_max\":%llu,\"received_total\":%llu", (unsigned long long)(members ? per_min : 0),
           (unsigned long long)per_max, (unsigned long long)received);
    printf(",\"complete\":%s,\"dropped\":%d,\"errors\":{", ok && lost == 0 && extra == 0 ? "true" : "false", dropped);
    for (int i = 0; i < n_err; i++)
        printf("%s\"%s\":%llu", i ? "," : "", err_name[i], (unsigned long long)err_count[i]);
    printf("}}\n");
    fflush(stdout);
}

static void event(const char *name) {
    printf("{\"event\":\"%s\",\"t\":%.6f}\n", name, mono());
    fflush(stdout);
}

static void usage(void) {
    fprintf(stderr,
            "usage: cgen --port P [--host 127.0.0.1] [--proto native|irc] [-R receivers] [-S senders]\n"
            "            [--window K] [--duration S] [--warmup S] [--msg-size N] [--ramp-rate N/s]\n"
            "            [--max-pending N] [--register-timeout S] [--settle-quiet S] [--drain-timeout S]\n"
            "            [--drain-quiet S] [--sample-every N] [--cpu N] [--channel #lobby]\n"
            "            [--quickack window|all|none] [--messages N per sender] [--bulk-ms MS] [--probes N]\n"
            "            [--rate N messages/s over all senders; 0: window mode]\n");
    exit(2);
}

static double num(const char *s, double lo, double hi, const char *what) {
    char *e;
    double v = strtod(s, &e);
    if (*s == 0 || *e != 0 || !(v >= lo && v <= hi)) {
        fprintf(stderr, "cgen: bad %s: %s\n", what, s);
        die("bad option");
    }
    return v;
}

static void parse_args(int argc, char **argv) {
    static struct option longs[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"proto", 1, 0, 'P'}, {"receivers", 1, 0, 'R'},
        {"senders", 1, 0, 'S'}, {"window", 1, 0, 'w'}, {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'W'},
        {"msg-size", 1, 0, 'm'}, {"ramp-rate", 1, 0, 'r'}, {"max-pending", 1, 0, 'M'},
        {"register-timeout", 1, 0, 't'}, {"settle-quiet", 1, 0, 'q'}, {"drain-timeout", 1, 0, 'D'},
        {"drain-quiet", 1, 0, 'Q'}, {"sample-every", 1, 0, 'e'}, {"cpu", 1, 0, 'c'}, {"channel", 1, 0, 'C'}, {"quickack", 1, 0, 'k'}, {"messages", 1, 0, 'n'}, {"bulk-ms", 1, 0, 'b'}, {"probes", 1, 0, 'o'},
        {"rate", 1, 0, 'a'}, {"help", 0, 0, '?'}, {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "R:S:", longs, NULL)) != -1) {
        switch (ch) {
        case 'h': snprintf(opt.host, sizeof opt.host, "%s", optarg); break;
        case 'p': opt.port = (int)num(optarg, 1, 65535, "port"); break;
        case 'P':
            if (strcmp(optarg, "native") == 0) opt.proto = P_NATIVE;
            else if (strcmp(optarg, "irc") == 0) opt.proto = P_IRC;
            else usage();
            break;
        case 'R': opt.receivers = (int)num(optarg, 0, MAX_CONNS - 100, "receivers"); break;
        case 'S': opt.senders = (int)num(optarg, 1, (double)(sizeof SID_ALPHABET - 1), "senders"); break;
        case 'w': opt.window = (int)num(optarg, 1, 1000, "window"); break;
        case 'd': opt.duration = num(optarg, 0.05, 600, "duration"); break;
        case 'W': opt.warmup = num(optarg, 0, 600, "warmup"); break;
        case 'm': opt.msg_size = (int)num(optarg, TEXT_HEAD + 1, 4000, "msg-size"); break;
        case 'r': opt.ramp_rate = num(optarg, 1, 1e6, "ramp-rate"); break;
        case 'M': opt.max_pending = (int)num(optarg, 1, MAX_CONNS, "max-pending"); break;
        case 't': opt.register_timeout = num(optarg, 0.1, 3600, "register-timeout"); break;
        case 'q': opt.settle_quiet = num(optarg, 0, 60, "settle-quiet"); break;
        case 'D': opt.drain_timeout = num(optarg, 0.1, 600, "drain-timeout"); break;
        case 'Q': opt.drain_quiet = num(optarg, 0, 60, "drain-quiet"); break;
        case 'e': opt.sample_every = (int)num(optarg, 1, 1e6, "sample-every"); break;
        case 'b': opt.bulk_ms = num(optarg, 0, 1000, "bulk-ms"); break;
        case 'o': opt.probes = (int)num(optarg, 0, MAX_CONNS, "probes"); break;
        case 'a': opt.rate = num(optarg, 0, 1e6, "rate"); break;
        case 'n': opt.messages = (long)num(optarg, 0, 1e9, "messages"); break;
        case 'k':
            if (strcmp(optarg, "none") == 0) opt.quickack = 0;
            else if (strcmp(optarg, "window") == 0) opt.quickack = 1;
            else if (strcmp(optarg, "all") == 0) opt.quickack = 2;
            else usage();
            break;
        case 'c': opt.cpu = (int)num(optarg, 0, 4095, "cpu"); break;
        case 'C':
            if (optarg[0] != '#' || strlen(optarg) >= sizeof opt.channel || strpbrk(optarg, " \r\n\""))
                usage();
            snprintf(opt.channel, sizeof opt.channel, "%s", optarg);
            break;
        default: usage();
        }
    }
    if (optind != argc || !opt.port)
        usage();
    if (opt.proto == P_IRC && opt.receivers < opt.senders)
        die("the IRC workload needs at least as many receivers as senders (one counter each)");
    if (opt.sample_every < 0)
        opt.sample_every = opt.rate > 0 ? 1 : 4; /* rate mode times every message */
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1 || (ntohl(addr.sin_addr.s_addr) >> 24) != 127)
        die("the host must be a loopback address (127.x.y.z)");
    /* the whole run's budget; past it the kernel ends the process (a bound, not a measure) */
    double budget = opt.register_timeout + 10 + opt.warmup + opt.duration + opt.drain_timeout + 15;
    alarm((unsigned)budget + 1);
    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0)
            die("sched_setaffinity failed");
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    /* texts */
    say_tail_len = (size_t)(opt.msg_size - TEXT_HEAD) + 2;
    say_tail = malloc(say_tail_len);
    rb = malloc(RB_SIZE + MAX_TAIL);
    hist = calloc(HIST_BUCKETS, sizeof *hist);
    if (!say_tail || !rb || !hist)
        die("out of memory");
    memset(say_tail, 'x', say_tail_len - 2);
    if (opt.proto == P_NATIVE) {
        say_head_len = (size_t)snprintf((char *)say_head, sizeof say_head, "{\"type\":\"say\",\"room\":\"%s\",\"text\":\"~@", opt.channel);
        memcpy(say_tail + say_tail_len - 2, "\"}", 2);
    } else {
        say_head_len = (size_t)snprintf((char *)say_head, sizeof say_head, "PRIVMSG %s :~@", opt.channel);
        memcpy(say_tail + say_tail_len - 2, "\r\n", 2);
    }
    if (say_head_len + 1 + TS_DIGITS + say_tail_len + 4 > 8192)
        die("message too long");

    /* members: senders spread evenly through the connection order; IRC counters spread evenly
       across the receivers, counter k at receiver round(k * R / S) */
    nconns = opt.receivers + opt.senders;
    conns = calloc((size_t)nconns, sizeof *conns);
    sender_idx = calloc((size_t)opt.senders, sizeof *sender_idx);
    if (!conns || !sender_idx)
        die("out of memory");
    int next_sender = 0, next_recv = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->fd = -1;
        c->state = DEAD;
        c->counts_for = -1;
        c->sid = -1;
        c->countdown = 1 + (uint32_t)(i % opt.sample_every);
        int is_sender = next_sender < opt.senders &&
                        (long)i >= ((long)next_sender * nconns) / opt.senders;
        if (is_sender || next_recv >= opt.receivers) {
            c->sid = next_sender;
            sender_idx[next_sender] = i;
            c->own = (unsigned char)SID_ALPHABET[next_sender];
            snprintf(c->nick, sizeof c->nick, "s%04d", next_sender++);
        } else {
            snprintf(c->nick, sizeof c->nick, "r%05d", next_recv++);
        }
    }
    if (opt.proto == P_IRC) {
        int r = 0;
        int k = 0;
        for (int i = 0; i < nconns && k < opt.senders; i++) {
            if (conns[i].sid >= 0)
                continue;
            long want = ((long)k * opt.receivers * 2 + opt.senders) / (2L * opt.senders); /* round(k*R/S) */
            if (r == want) {
                conns[i].counts_for = k;
                conns[i].own = (unsigned char)SID_ALPHABET[k];
                k++;
            }
            r++;
        }
        for (int s = 0; s < opt.senders; s++)
            conns[sender_idx[s]].own = 0; /* IRC never echoes: a sender counts nothing as its own */
    }

    /* bulk receivers: all but the senders, the counters and --probes receivers picked evenly */
    if (opt.bulk_ms < 0) {
        double ms = opt.receivers / 100.0; /* 1 ms up to 100 receivers, 10 ms at 1,000 */
        opt.bulk_ms = ms < 1 ? 1 : ms > 20 ? 20 : ms;
    }
    if (opt.bulk_ms > 0) {
        int probes = opt.probes < opt.receivers ? opt.probes : opt.receivers;
        int r = 0, k = 0;
        for (int i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->sid >= 0)
                continue;
            long want = k < probes ? ((long)k * opt.receivers * 2 + probes) / (2L * probes) : -1; /* round(k*R/P) */
            if (r == want)
                k++;
            else if (c->counts_for < 0)
                c->bulk = 1;
            r++;
        }
    }
    bulk_interval = opt.bulk_ms / 1000.0;

    ep = epoll_create1(EPOLL_CLOEXEC);
    ep_bulk = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 || ep_bulk < 0)
        die("epoll_create1 failed");
    bulk_every_pass(1);

    /* ---- connect and register ---- */
    double t_reg0 = mono();
    double reg_deadline = t_reg0 + opt.register_timeout;
    int next = 0;
    now_s = t_reg0;
    while (reg_ok + reg_failed < nconns && now_s < reg_deadline) {
        int due = (int)((now_s - t_reg0) * opt.ramp_rate) + 1 - opened;
        while (due-- > 0 && pending < opt.max_pending && next < nconns)
            open_conn(&conns[next++]);
        poll_once(next < nconns ? 1 : ms_until(reg_deadline));
    }
    if (reg_ok != nconns) {
        char msg[96];
        snprintf(msg, sizeof msg, "registered %d of %d connections", reg_ok, nconns);
        struct snap z = take_snap();
        print_result(0, msg, t_last_ready - t_first_connect, &z, &z);
        return 3;
    }
    double register_s = t_last_ready - t_first_connect;
    printf("{\"event\":\"registered\",\"n\":%d,\"seconds\":%.3f}\n", reg_ok, register_s);
    fflush(stdout);

    /* ---- settle: the joins of the others reach everybody ---- */
    double settle_deadline = mono() + 10;
    last_rx = now_s = mono();
    while (now_s - last_rx < opt.settle_quiet && now_s < settle_deadline)
        poll_once(20);
    for (int i = 0; i < nconns; i++)
        conns[i].msgs0 = conns[i].msgs;
    uint64_t base_msgs = total_msgs;
    (void)base_msgs;

    /* ---- load ---- */
    double t_send = mono();
    double t0 = t_send + opt.warmup, t1 = t0 + opt.duration;
    sending = 1;
    now_s = t_send;
    if (bulk_interval > 0) {
        next_bulk = t_send + bulk_interval;
        bulk_every_pass(0);
    }
    if (opt.rate > 0) {
        rate_t0 = t_send; /* message 0 goes out on the first pass */
    } else {
        for (int s = 0; s < opt.senders; s++)
            top_up(&conns[sender_idx[s]]);
    }
    while (now_s < t0)
        poll_once(ms_until(t0));
    struct snap a = take_snap();
    sampling = 1;
    event("start");
    while (now_s < t1)
        poll_once(ms_until(t1));
    struct snap b = take_snap();
    sampling = 0;
    sending = 0;
    event("end");
    bulk_every_pass(1);

    /* ---- drain ---- */
    double drain_deadline = mono() + opt.drain_timeout;
    while (!((now_s - last_rx >= opt.drain_quiet && now_s >= t1 + opt.drain_quiet) || now_s >= drain_deadline))
        poll_once(20);
    print_result(1, NULL, register_s, &a, &b);
    for (int i = 0; i < nconns; i++)
        close_conn(&conns[i]);
    return 0;
}
