/*
 * calls-server: a complete SFU in one C file on libcalls, plain POSIX sockets and poll(2).
 *
 *   calls-server [--media ADDR:PORT] [--signal ADDR:PORT] [--version] [--help]
 *
 * Media: UDP and ICE-TCP on one port (default 127.0.0.1:8443; port 0 picks a free one).
 * Signaling (default 127.0.0.1:8444): JSON lines over TCP, one connection per participant.
 *   client -> server, first line: {"join":{"call":"standup","user":"alice"}}
 *                                 (ids are plain strings without backslash escapes)
 *   server -> client:             {"joined":{"session":7}}  or  {"error":{"message":"..."}}
 *   then both ways: the JSON messages of docs/signaling.md, one per line (the client sends
 *   ClientMessage lines, e.g. its offer; the server writes ServerMessage lines).
 *   Closing the connection leaves the call.
 * Once listening, it prints one line to stdout:
 *   listening media=127.0.0.1:8443 signal=127.0.0.1:8444
 * SIGINT/SIGTERM: every session leaves, the router is freed, exit status 0.
 *
 * Build: make -C calls-ffi server. docs/embedding-c.md walks through the loop below.
 * Simplifications of an example: one thread; signaling writes wait for the socket; a TCP
 * media frame that does not fit the socket buffer is dropped (ICE-TCP media is
 * loss-tolerant); no TLS and no authentication on the signaling port (keep it on localhost
 * or behind your own auth).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "calls.h"

#define MAX_CLIENTS 64
#define MAX_TCP_MEDIA 64
/* A signaling line: the router's limit (256 KiB) plus room for the newline. */
#define MAX_LINE (256 * 1024 + 16)

typedef struct {
    int fd; /* -1: free slot */
    uint64_t session;
    int joined;
    char *line; /* bytes of the current, incomplete line */
    size_t line_len;
} signal_client;

typedef struct {
    int fd; /* -1: free slot */
    uint64_t conn;
} tcp_media;

static volatile sig_atomic_t stopping;
static calls_router *router;
static int udp_fd = -1;
static int tcp_listen_fd = -1;
static int signal_listen_fd = -1;
static signal_client clients[MAX_CLIENTS];
static tcp_media tcp_conns[MAX_TCP_MEDIA];
static uint64_t next_session = 1;
static uint64_t next_conn = 1;
static uint8_t *out_buf;
static size_t out_buf_len;

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

/* The monotonic clock every `now_us` comes from. */
static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static const char *error_text(void) {
    static char message[1024];
    size_t len;
    if (calls_last_error_message(message, sizeof message, &len) != CALLS_RESULT_OK) {
        snprintf(message, sizeof message, "(message too long)");
    }
    return message;
}

static void fail(const char *what) {
    fprintf(stderr, "calls-server: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- addresses: struct sockaddr <-> calls_address ------------------------------------- */

static calls_address from_sockaddr(const struct sockaddr_storage *ss) {
    calls_address a;
    memset(&a, 0, sizeof a);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        a.family = CALLS_ADDRESS_IPV4;
        a.port = ntohs(in->sin_port);
        memcpy(a.ip, &in->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        a.family = CALLS_ADDRESS_IPV6;
        a.port = ntohs(in6->sin6_port);
        memcpy(a.ip, &in6->sin6_addr, 16);
        a.scope_id = in6->sin6_scope_id;
    }
    return a;
}

static socklen_t to_sockaddr(const calls_address *a, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (a->family == CALLS_ADDRESS_IPV4) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(a->port);
        memcpy(&in->sin_addr, a->ip, 4);
        return sizeof *in;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(a->port);
    memcpy(&in6->sin6_addr, a->ip, 16);
    in6->sin6_scope_id = a->scope_id;
    return sizeof *in6;
}

static calls_address local_address(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
        fail("getsockname");
    }
    return from_sockaddr(&ss);
}

static void format_address(const calls_address *a, char *text, size_t size) {
    size_t len;
    if (calls_address_format(a, text, size, &len) != CALLS_RESULT_OK) {
        snprintf(text, size, "?");
    }
}

/* A socket of `type` bound to `addr` (a listening one for TCP). Returns -1 on EADDRINUSE. */
static int bound_socket(int type, const calls_address *addr) {
    struct sockaddr_storage ss;
    socklen_t len = to_sockaddr(addr, &ss);
    int fd = socket(ss.ss_family, type, 0);
    if (fd < 0) {
        fail("socket");
    }
    int one = 1;
    if (type == SOCK_STREAM) {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    }
    if (bind(fd, (struct sockaddr *)&ss, len) != 0) {
        if (errno == EADDRINUSE) {
            close(fd);
            return -1;
        }
        fail("bind");
    }
    if (type == SOCK_STREAM && listen(fd, 64) != 0) {
        fail("listen");
    }
    return fd;
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
        fail("fcntl");
    }
}

/* ---- signaling connections -------------------------------------------------------------- */

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* Signaling is small and rare: wait (bounded) until the socket takes more. */
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, 1000) > 0) {
                continue;
            }
            return;
        }
        if (n <= 0) {
            return; /* the reader is gone; its EOF will end the session */
        }
        data += n;
        len -= (size_t)n;
    }
}

static void write_line(int fd, const char *json, size_t len) {
    write_all(fd, json, len);
    write_all(fd, "\n", 1);
}

static signal_client *client_of_session(uint64_t session) {
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (clients[i].fd >= 0 && clients[i].joined && clients[i].session == session) {
            return &clients[i];
        }
    }
    return NULL;
}

static void close_client(signal_client *c) {
    close(c->fd);
    free(c->line);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

/* The string value of `"key":"value"` in a flat JSON object (no escapes). */
static int json_string_field(const char *json, const char *key, char *out, size_t size) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *at = strstr(json, quoted);
    if (at == NULL) {
        return 0;
    }
    at += strlen(quoted);
    while (*at == ' ' || *at == ':') {
        at++;
    }
    if (*at++ != '"') {
        return 0;
    }
    size_t len = 0;
    while (at[len] != '"') {
        if (at[len] == '\0' || at[len] == '\\' || len + 1 >= size) {
            return 0;
        }
        out[len] = at[len];
        len++;
    }
    out[len] = '\0';
    return len > 0;
}

/* ---- the drain loop --------------------------------------------------------------------- */

static void send_tcp_frame(uint64_t conn, const uint8_t *data, size_t len) {
    for (int i = 0; i < MAX_TCP_MEDIA; i++) {
        if (tcp_conns[i].fd >= 0 && tcp_conns[i].conn == conn) {
            /* Frames carry their RFC 4571 length prefix already; a partial write would break
             * the framing, so a frame that does not fit is dropped whole (see the header). */
            (void)send(tcp_conns[i].fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
            return;
        }
    }
}

/* Drains every output; returns the deadline for calls_router_handle_timeout. */
static uint64_t drain(void) {
    for (;;) {
        calls_output out;
        calls_result result = calls_router_poll_output(router, &out, out_buf, out_buf_len);
        if (result == CALLS_RESULT_BUFFER_TOO_SMALL) {
            uint8_t *grown = realloc(out_buf, out.len);
            if (grown == NULL) {
                fail("realloc");
            }
            out_buf = grown;
            out_buf_len = out.len;
            continue;
        }
        if (result != CALLS_RESULT_OK) {
            fprintf(stderr, "calls-server: poll_output: %s\n", error_text());
            exit(1);
        }
        switch (out.kind) {
        case CALLS_OUTPUT_KIND_TRANSMIT:
            if (out.proto == CALLS_PROTO_UDP) {
                struct sockaddr_storage to;
                socklen_t to_len = to_sockaddr(&out.destination, &to);
                (void)sendto(udp_fd, out_buf, out.len, 0, (struct sockaddr *)&to, to_len);
            } else {
                send_tcp_frame(out.conn, out_buf, out.len);
            }
            break;
        case CALLS_OUTPUT_KIND_SIGNAL: {
            signal_client *c = client_of_session(out.session);
            if (c != NULL) {
                write_line(c->fd, (const char *)out_buf, out.len);
            }
            break;
        }
        case CALLS_OUTPUT_KIND_EVENT:
            fprintf(stderr, "calls-server: event %s\n", (const char *)out_buf);
            if (out.event == CALLS_EVENT_KIND_LEFT) {
                /* Disconnected by the router (ICE/DTLS gone): end its signaling too. */
                signal_client *c = client_of_session(out.session);
                if (c != NULL) {
                    close_client(c);
                }
            }
            break;
        case CALLS_OUTPUT_KIND_TIMEOUT:
        default:
            return out.timeout_us;
        }
    }
}

/* One complete line from a signaling client. */
static void handle_line(signal_client *c, char *line) {
    if (!c->joined) {
        char call[256];
        char user[256];
        if (strstr(line, "\"join\"") == NULL || !json_string_field(line, "call", call, sizeof call) ||
            !json_string_field(line, "user", user, sizeof user)) {
            const char reply[] = "{\"error\":{\"message\":\"first line must be {\\\"join\\\":"
                                 "{\\\"call\\\":\\\"...\\\",\\\"user\\\":\\\"...\\\"}}\"}}";
            write_line(c->fd, reply, strlen(reply));
            close_client(c);
            return;
        }
        uint64_t session = next_session++;
        if (calls_router_join(router, call, session, user, CALLS_GRANTS_ALL, now_us()) !=
            CALLS_RESULT_OK) {
            char reply[1400];
            int n = snprintf(reply, sizeof reply, "{\"error\":{\"message\":\"join refused: %.1024s\"}}",
                             error_text());
            write_line(c->fd, reply, (size_t)n);
            close_client(c);
            return;
        }
        c->joined = 1;
        c->session = session;
        char reply[64];
        int n = snprintf(reply, sizeof reply, "{\"joined\":{\"session\":%llu}}",
                         (unsigned long long)session);
        write_line(c->fd, reply, (size_t)n);
        return;
    }
    if (line[0] == '\0') {
        return;
    }
    /* A refused message has been answered to the client with an "error" message already. */
    if (calls_router_handle_signal(router, c->session, line, now_us()) != CALLS_RESULT_OK) {
        fprintf(stderr, "calls-server: session %llu: %s\n", (unsigned long long)c->session,
                error_text());
    }
}

static void read_client(signal_client *c) {
    char chunk[16384];
    ssize_t n = recv(c->fd, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return;
    }
    if (n <= 0) {
        if (c->joined) {
            (void)calls_router_leave(router, c->session, now_us());
        }
        close_client(c);
        return;
    }
    for (ssize_t i = 0; i < n && c->fd >= 0; i++) {
        if (chunk[i] == '\n') {
            c->line[c->line_len] = '\0';
            c->line_len = 0;
            handle_line(c, c->line);
            /* Drain after every input: the answer goes out before the next line is read. */
            (void)drain();
        } else if (c->line_len + 1 < MAX_LINE) {
            c->line[c->line_len++] = chunk[i];
        } else {
            fprintf(stderr, "calls-server: signaling line too long; closing\n");
            if (c->joined) {
                (void)calls_router_leave(router, c->session, now_us());
            }
            close_client(c);
        }
    }
}

static void accept_client(void) {
    int fd = accept(signal_listen_fd, NULL, NULL);
    if (fd < 0) {
        return;
    }
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (clients[i].fd < 0) {
            clients[i].line = malloc(MAX_LINE);
            if (clients[i].line == NULL) {
                fail("malloc");
            }
            set_nonblocking(fd);
            clients[i].fd = fd;
            return;
        }
    }
    close(fd); /* full */
}

/* ---- media ------------------------------------------------------------------------------ */

static void read_udp(const calls_address *local) {
    uint8_t datagram[2048];
    for (;;) {
        struct sockaddr_storage from;
        socklen_t from_len = sizeof from;
        ssize_t n = recvfrom(udp_fd, datagram, sizeof datagram, MSG_DONTWAIT,
                             (struct sockaddr *)&from, &from_len);
        if (n < 0) {
            return; /* EAGAIN: all read */
        }
        calls_address source = from_sockaddr(&from);
        (void)calls_router_handle_datagram(router, &source, local, datagram, (size_t)n, now_us());
        (void)drain();
    }
}

static void accept_tcp_media(void) {
    struct sockaddr_storage from;
    socklen_t from_len = sizeof from;
    int fd = accept(tcp_listen_fd, (struct sockaddr *)&from, &from_len);
    if (fd < 0) {
        return;
    }
    for (int i = 0; i < MAX_TCP_MEDIA; i++) {
        if (tcp_conns[i].fd < 0) {
            calls_address remote = from_sockaddr(&from);
            calls_address local = local_address(fd);
            uint64_t conn = next_conn++;
            if (calls_router_tcp_accepted(router, conn, &remote, &local) != CALLS_RESULT_OK) {
                break;
            }
            set_nonblocking(fd);
            tcp_conns[i].fd = fd;
            tcp_conns[i].conn = conn;
            return;
        }
    }
    close(fd);
}

static void read_tcp_media(tcp_media *t) {
    uint8_t chunk[16384];
    ssize_t n = recv(t->fd, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return;
    }
    calls_result result = n > 0
        ? calls_router_handle_tcp_data(router, t->conn, chunk, (size_t)n, now_us())
        : calls_router_tcp_closed(router, t->conn);
    (void)drain();
    if (n <= 0 || result != CALLS_RESULT_OK) {
        /* EOF, or the router forgot the connection (not ICE-TCP): close it. */
        close(t->fd);
        t->fd = -1;
    }
}

/* ---- main ------------------------------------------------------------------------------- */

static const char USAGE[] = "usage: %s [--media ADDR:PORT] [--signal ADDR:PORT] [--version]\n";

int main(int argc, char **argv) {
    const char *media_arg = "127.0.0.1:8443";
    const char *signal_arg = "127.0.0.1:8444";
    /* Every argument is read: a lone or unknown flag is refused, never ignored. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf(USAGE, argv[0]);
            return 0;
        } else if (strcmp(argv[i], "--version") == 0) {
            const char *version = "unknown";
            calls_version(&version);
            printf("%s\n", version);
            return 0;
        } else if (strcmp(argv[i], "--media") == 0 && i + 1 < argc) {
            media_arg = argv[++i];
        } else if (strcmp(argv[i], "--signal") == 0 && i + 1 < argc) {
            signal_arg = argv[++i];
        } else {
            fprintf(stderr, USAGE, argv[0]);
            return 2;
        }
    }
    calls_address media;
    calls_address signaling;
    if (calls_address_parse(media_arg, &media) != CALLS_RESULT_OK ||
        calls_address_parse(signal_arg, &signaling) != CALLS_RESULT_OK) {
        fprintf(stderr, "calls-server: %s\n", error_text());
        return 2;
    }

    /* UDP and TCP media on the same port number; with port 0, find one free for both. */
    for (int attempt = 0; attempt < 20 && tcp_listen_fd < 0; attempt++) {
        calls_address want = media;
        udp_fd = bound_socket(SOCK_DGRAM, &want);
        if (udp_fd < 0) {
            fprintf(stderr, "calls-server: UDP port %u is in use\n", media.port);
            return 1;
        }
        want.port = local_address(udp_fd).port;
        tcp_listen_fd = bound_socket(SOCK_STREAM, &want);
        if (tcp_listen_fd < 0) {
            close(udp_fd);
            udp_fd = -1;
            if (media.port != 0) {
                fprintf(stderr, "calls-server: TCP port %u is in use\n", media.port);
                return 1;
            }
        }
    }
    if (tcp_listen_fd < 0) {
        fprintf(stderr, "calls-server: found no port free for both UDP and TCP\n");
        return 1;
    }
    signal_listen_fd = bound_socket(SOCK_STREAM, &signaling);
    if (signal_listen_fd < 0) {
        fprintf(stderr, "calls-server: signaling port %u is in use\n", signaling.port);
        return 1;
    }
    set_nonblocking(tcp_listen_fd);
    set_nonblocking(signal_listen_fd);
    calls_address local = local_address(udp_fd);
    signaling = local_address(signal_listen_fd);

    /* The router advertises the media address as its ICE host candidate. */
    char media_text[64];
    char signal_text[64];
    format_address(&local, media_text, sizeof media_text);
    format_address(&signaling, signal_text, sizeof signal_text);
    char ip[64];
    snprintf(ip, sizeof ip, "%s", media_text);
    char *colon = strrchr(ip, ':');
    *colon = '\0';
    const char *bare_ip = ip[0] == '[' ? ip + 1 : ip;
    if (ip[0] == '[') {
        ip[strlen(ip) - 1] = '\0';
    }
    char config[256];
    snprintf(config, sizeof config, "{\"udp_port\":%u,\"tcp_port\":%u,\"bind_address\":\"%s\"}",
             local.port, local.port, bare_ip);
    if (calls_router_new_json(config, now_us(), &router) != CALLS_RESULT_OK) {
        fprintf(stderr, "calls-server: %s\n", error_text());
        return 1;
    }

    for (int i = 0; i < MAX_CLIENTS; i++) {
        clients[i].fd = -1;
    }
    for (int i = 0; i < MAX_TCP_MEDIA; i++) {
        tcp_conns[i].fd = -1;
    }
    out_buf_len = 65536;
    out_buf = malloc(out_buf_len);
    if (out_buf == NULL) {
        fail("malloc");
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    printf("listening media=%s signal=%s\n", media_text, signal_text);
    fflush(stdout);

    uint64_t deadline = drain();
    while (!stopping) {
        /* Sleep until a socket is readable or the router's deadline. */
        struct pollfd fds[3 + MAX_CLIENTS + MAX_TCP_MEDIA];
        signal_client *fd_client[3 + MAX_CLIENTS + MAX_TCP_MEDIA] = {0};
        tcp_media *fd_tcp[3 + MAX_CLIENTS + MAX_TCP_MEDIA] = {0};
        nfds_t n = 0;
        fds[n++] = (struct pollfd){.fd = udp_fd, .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = tcp_listen_fd, .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = signal_listen_fd, .events = POLLIN};
        for (int i = 0; i < MAX_CLIENTS; i++) {
            if (clients[i].fd >= 0) {
                fd_client[n] = &clients[i];
                fds[n++] = (struct pollfd){.fd = clients[i].fd, .events = POLLIN};
            }
        }
        for (int i = 0; i < MAX_TCP_MEDIA; i++) {
            if (tcp_conns[i].fd >= 0) {
                fd_tcp[n] = &tcp_conns[i];
                fds[n++] = (struct pollfd){.fd = tcp_conns[i].fd, .events = POLLIN};
            }
        }
        uint64_t now = now_us();
        int wait_ms = deadline > now ? (int)((deadline - now + 999) / 1000) : 0;
        if (poll(fds, n, wait_ms) < 0 && errno != EINTR) {
            fail("poll");
        }

        /* Feed every input, draining after each one. */
        if (fds[0].revents & POLLIN) {
            read_udp(&local);
        }
        if (fds[1].revents & POLLIN) {
            accept_tcp_media();
        }
        if (fds[2].revents & POLLIN) {
            accept_client();
        }
        for (nfds_t i = 3; i < n; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                continue;
            }
            if (fd_client[i] != NULL && fd_client[i]->fd == fds[i].fd) {
                read_client(fd_client[i]);
            } else if (fd_tcp[i] != NULL && fd_tcp[i]->fd == fds[i].fd) {
                read_tcp_media(fd_tcp[i]);
            }
        }
        if (now_us() >= deadline) {
            (void)calls_router_handle_timeout(router, now_us());
        }
        deadline = drain();
    }

    /* Shut down: every session leaves politely, then everything is freed. */
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (clients[i].fd >= 0) {
            if (clients[i].joined) {
                (void)calls_router_leave(router, clients[i].session, now_us());
                (void)drain();
            }
            if (clients[i].fd >= 0) {
                close_client(&clients[i]);
            }
        }
    }
    for (int i = 0; i < MAX_TCP_MEDIA; i++) {
        if (tcp_conns[i].fd >= 0) {
            close(tcp_conns[i].fd);
        }
    }
    calls_router_free(router);
    free(out_buf);
    close(udp_fd);
    close(tcp_listen_fd);
    close(signal_listen_fd);
    fprintf(stderr, "calls-server: stopped\n");
    return 0;
}
