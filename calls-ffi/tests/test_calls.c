/*
 * C tests of libcalls: drive the C API in-process, including every error path.
 * Built and run by `make -C calls-ffi test` under AddressSanitizer and under valgrind.
 * Prints "N passed, M failed" and exits non-zero on any failure.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calls.h"

static int passed;
static int failed;

static const char *result_name(calls_result result) {
    const char *name = "?";
    if (calls_result_name(result, &name) != CALLS_RESULT_OK) {
        return "(not a calls_result)";
    }
    return name;
}

/* The last error message of this thread, in a static buffer. */
static const char *last_error(void) {
    static char message[4096];
    size_t len = 0;
    if (calls_last_error_message(message, sizeof message, &len) != CALLS_RESULT_OK) {
        return "(message too long)";
    }
    return message;
}

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (cond) {                                                                   \
            passed++;                                                                 \
        } else {                                                                      \
            failed++;                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
        }                                                                             \
    } while (0)

#define CHECK_RESULT(expr, expected)                                                  \
    do {                                                                              \
        calls_result got_ = (expr);                                                   \
        if (got_ == (expected)) {                                                     \
            passed++;                                                                 \
        } else {                                                                      \
            failed++;                                                                 \
            fprintf(stderr, "%s:%d: %s\n  returned %s, expected %s (last error: %s)\n", \
                    __FILE__, __LINE__, #expr, result_name(got_),                     \
                    result_name(expected), last_error());                             \
        }                                                                             \
    } while (0)

#define CHECK_OK(expr) CHECK_RESULT(expr, CALLS_RESULT_OK)

/* The caller's monotonic clock, in microseconds: tests make up their own. */
#define T0 5000000u

/* A str0m client's offer: send-only Opus and VP8 (examples/print_canned_offer.rs made it). */
static const char OFFER[] =
    "{\"type\":\"offer\",\"sdp\":\"v=0\\r\\n"
    "o=str0m-0.25.0 4611498457813099671 2 IN IP4 0.0.0.0\\r\\n"
    "s=-\\r\\n"
    "t=0 0\\r\\n"
    "a=group:BUNDLE 0Ng DYT\\r\\n"
    "a=extmap-allow-mixed\\r\\n"
    "a=msid-semantic: WMS UmcvxSnJkDPPkjBKeoBZ XH60fB3IN0Z3i8TOguHC\\r\\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\\r\\n"
    "c=IN IP4 0.0.0.0\\r\\n"
    "a=candidate:fffeff7e32c583ef85edbb1a 1 udp 2130706175 127.0.0.1 40000 typ host ufrag HLsTIRH73tmUpIKz\\r\\n"
    "a=ice-ufrag:HLsTIRH73tmUpIKz\\r\\n"
    "a=ice-pwd:yAiQfintjblEVK6yib4Jdv\\r\\n"
    "a=ice-options:trickle\\r\\n"
    "a=fingerprint:sha-256 37:DA:E5:E9:1E:94:8A:0F:BF:92:73:2F:86:F8:21:93:97:D6:0B:3F:2B:93:EB:90:03:93:5F:51:8F:4E:8B:2E\\r\\n"
    "a=setup:actpass\\r\\n"
    "a=mid:0Ng\\r\\n"
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\\r\\n"
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\\r\\n"
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\\r\\n"
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\\r\\n"
    "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\\r\\n"
    "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\\r\\n"
    "a=sendonly\\r\\n"
    "a=msid:UmcvxSnJkDPPkjBKeoBZ E0JRthtRvi9U8S3VAurG\\r\\n"
    "a=rtcp-mux\\r\\n"
    "a=rtpmap:111 opus/48000/2\\r\\n"
    "a=rtcp-fb:111 transport-cc\\r\\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\\r\\n"
    "a=ssrc:2715626518 cname:E0JRthtRvi9U8S3VAurG\\r\\n"
    "a=ssrc:2715626518 msid:UmcvxSnJkDPPkjBKeoBZ E0JRthtRvi9U8S3VAurG\\r\\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 127 121 125 107 108 109 124 120 123 119 35 36 114 115 102 103 98 99 100 101 45 46\\r\\n"
    "c=IN IP4 0.0.0.0\\r\\n"
    "a=ice-ufrag:HLsTIRH73tmUpIKz\\r\\n"
    "a=ice-pwd:yAiQfintjblEVK6yib4Jdv\\r\\n"
    "a=ice-options:trickle\\r\\n"
    "a=fingerprint:sha-256 37:DA:E5:E9:1E:94:8A:0F:BF:92:73:2F:86:F8:21:93:97:D6:0B:3F:2B:93:EB:90:03:93:5F:51:8F:4E:8B:2E\\r\\n"
    "a=setup:actpass\\r\\n"
    "a=mid:DYT\\r\\n"
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\\r\\n"
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\\r\\n"
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\\r\\n"
    "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\\r\\n"
    "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\\r\\n"
    "a=extmap:13 urn:3gpp:video-orientation\\r\\n"
    "a=sendonly\\r\\n"
    "a=msid:XH60fB3IN0Z3i8TOguHC U8BzeNFeVHGtA8tO8ckU\\r\\n"
    "a=rtcp-mux\\r\\n"
    "a=rtpmap:96 VP8/90000\\r\\n"
    "a=rtcp-fb:96 transport-cc\\r\\n"
    "a=rtcp-fb:96 goog-remb\\r\\n"
    "a=rtcp-fb:96 ccm fir\\r\\n"
    "a=rtcp-fb:96 nack\\r\\n"
    "a=rtcp-fb:96 nack pli\\r\\n"
    "a=rtpmap:97 rtx/90000\\r\\n"
    "a=fmtp:97 apt=96\\r\\n"
    "a=rtpmap:127 H264/90000\\r\\n"
    "a=rtcp-fb:127 transport-cc\\r\\n"
    "a=rtcp-fb:127 goog-remb\\r\\n"
    "a=rtcp-fb:127 ccm fir\\r\\n"
    "a=rtcp-fb:127 nack\\r\\n"
    "a=rtcp-fb:127 nack pli\\r\\n"
    "a=fmtp:127 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\\r\\n"
    "a=rtpmap:121 rtx/90000\\r\\n"
    "a=fmtp:121 apt=127\\r\\n"
    "a=rtpmap:125 H264/90000\\r\\n"
    "a=rtcp-fb:125 transport-cc\\r\\n"
    "a=rtcp-fb:125 goog-remb\\r\\n"
    "a=rtcp-fb:125 ccm fir\\r\\n"
    "a=rtcp-fb:125 nack\\r\\n"
    "a=rtcp-fb:125 nack pli\\r\\n"
    "a=fmtp:125 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f\\r\\n"
    "a=rtpmap:107 rtx/90000\\r\\n"
    "a=fmtp:107 apt=125\\r\\n"
    "a=rtpmap:108 H264/90000\\r\\n"
    "a=rtcp-fb:108 transport-cc\\r\\n"
    "a=rtcp-fb:108 goog-remb\\r\\n"
    "a=rtcp-fb:108 ccm fir\\r\\n"
    "a=rtcp-fb:108 nack\\r\\n"
    "a=rtcp-fb:108 nack pli\\r\\n"
    "a=fmtp:108 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\\r\\n"
    "a=rtpmap:109 rtx/90000\\r\\n"
    "a=fmtp:109 apt=108\\r\\n"
    "a=rtpmap:124 H264/90000\\r\\n"
    "a=rtcp-fb:124 transport-cc\\r\\n"
    "a=rtcp-fb:124 goog-remb\\r\\n"
    "a=rtcp-fb:124 ccm fir\\r\\n"
    "a=rtcp-fb:124 nack\\r\\n"
    "a=rtcp-fb:124 nack pli\\r\\n"
    "a=fmtp:124 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f\\r\\n"
    "a=rtpmap:120 rtx/90000\\r\\n"
    "a=fmtp:120 apt=124\\r\\n"
    "a=rtpmap:123 H264/90000\\r\\n"
    "a=rtcp-fb:123 transport-cc\\r\\n"
    "a=rtcp-fb:123 goog-remb\\r\\n"
    "a=rtcp-fb:123 ccm fir\\r\\n"
    "a=rtcp-fb:123 nack\\r\\n"
    "a=rtcp-fb:123 nack pli\\r\\n"
    "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f\\r\\n"
    "a=rtpmap:119 rtx/90000\\r\\n"
    "a=fmtp:119 apt=123\\r\\n"
    "a=rtpmap:35 H264/90000\\r\\n"
    "a=rtcp-fb:35 transport-cc\\r\\n"
    "a=rtcp-fb:35 goog-remb\\r\\n"
    "a=rtcp-fb:35 ccm fir\\r\\n"
    "a=rtcp-fb:35 nack\\r\\n"
    "a=rtcp-fb:35 nack pli\\r\\n"
    "a=fmtp:35 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=4d001f\\r\\n"
    "a=rtpmap:36 rtx/90000\\r\\n"
    "a=fmtp:36 apt=35\\r\\n"
    "a=rtpmap:114 H264/90000\\r\\n"
    "a=rtcp-fb:114 transport-cc\\r\\n"
    "a=rtcp-fb:114 goog-remb\\r\\n"
    "a=rtcp-fb:114 ccm fir\\r\\n"
    "a=rtcp-fb:114 nack\\r\\n"
    "a=rtcp-fb:114 nack pli\\r\\n"
    "a=fmtp:114 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=64001f\\r\\n"
    "a=rtpmap:115 rtx/90000\\r\\n"
    "a=fmtp:115 apt=114\\r\\n"
    "a=rtpmap:102 H265/90000\\r\\n"
    "a=rtcp-fb:102 transport-cc\\r\\n"
    "a=rtcp-fb:102 goog-remb\\r\\n"
    "a=rtcp-fb:102 ccm fir\\r\\n"
    "a=rtcp-fb:102 nack\\r\\n"
    "a=rtcp-fb:102 nack pli\\r\\n"
    "a=fmtp:102 profile-id=1;tier-flag=0;level-id=180\\r\\n"
    "a=rtpmap:103 rtx/90000\\r\\n"
    "a=fmtp:103 apt=102\\r\\n"
    "a=rtpmap:98 VP9/90000\\r\\n"
    "a=rtcp-fb:98 transport-cc\\r\\n"
    "a=rtcp-fb:98 goog-remb\\r\\n"
    "a=rtcp-fb:98 ccm fir\\r\\n"
    "a=rtcp-fb:98 nack\\r\\n"
    "a=rtcp-fb:98 nack pli\\r\\n"
    "a=fmtp:98 profile-id=0\\r\\n"
    "a=rtpmap:99 rtx/90000\\r\\n"
    "a=fmtp:99 apt=98\\r\\n"
    "a=rtpmap:100 VP9/90000\\r\\n"
    "a=rtcp-fb:100 transport-cc\\r\\n"
    "a=rtcp-fb:100 goog-remb\\r\\n"
    "a=rtcp-fb:100 ccm fir\\r\\n"
    "a=rtcp-fb:100 nack\\r\\n"
    "a=rtcp-fb:100 nack pli\\r\\n"
    "a=fmtp:100 profile-id=2\\r\\n"
    "a=rtpmap:101 rtx/90000\\r\\n"
    "a=fmtp:101 apt=100\\r\\n"
    "a=rtpmap:45 AV1/90000\\r\\n"
    "a=rtcp-fb:45 transport-cc\\r\\n"
    "a=rtcp-fb:45 goog-remb\\r\\n"
    "a=rtcp-fb:45 ccm fir\\r\\n"
    "a=rtcp-fb:45 nack\\r\\n"
    "a=rtcp-fb:45 nack pli\\r\\n"
    "a=rtpmap:46 rtx/90000\\r\\n"
    "a=fmtp:46 apt=45\\r\\n"
    "a=ssrc:3031948857 cname:U8BzeNFeVHGtA8tO8ckU\\r\\n"
    "a=ssrc:3031948857 msid:XH60fB3IN0Z3i8TOguHC U8BzeNFeVHGtA8tO8ckU\\r\\n"
    "a=ssrc:1067619239 cname:U8BzeNFeVHGtA8tO8ckU\\r\\n"
    "a=ssrc:1067619239 msid:XH60fB3IN0Z3i8TOguHC U8BzeNFeVHGtA8tO8ckU\\r\\n"
    "a=ssrc-group:FID 3031948857 1067619239\\r\\n"
    "\"}"
    ;

/* ---------------------------------------------------------------------------------------- */
/* Draining                                                                                  */

typedef struct {
    int transmits;
    int signals;
    int events;
    int event_kinds[100];
    int records;
    int record_kinds[8];
    uint64_t recording;            /* the last record output's recording number */
    char *record_text;             /* every non-data record output's JSON, one per line */
    size_t record_text_len;
    char *signal_text; /* every signal's JSON, one per line */
    size_t signal_text_len;
    uint64_t signal_session;
    uint64_t timeout_us;
} drained;

static void append_line(char **text, size_t *text_len, const char *json, size_t len) {
    char *grown = realloc(*text, *text_len + len + 2);
    if (grown == NULL) {
        abort();
    }
    *text = grown;
    memcpy(*text + *text_len, json, len);
    *text_len += len;
    (*text)[(*text_len)++] = '\n';
    (*text)[*text_len] = '\0';
}

static void append_signal(drained *d, const char *json, size_t len) {
    append_line(&d->signal_text, &d->signal_text_len, json, len);
}

static void drained_reset(drained *d) {
    free(d->signal_text);
    free(d->record_text);
    memset(d, 0, sizeof *d);
}

/* Polls until a timeout, counting what came out. */
static void drain(calls_router *router, drained *d) {
    static uint8_t buf[65536];
    drained_reset(d);
    for (int i = 0; i < 10000; i++) {
        calls_output out;
        calls_result result = calls_router_poll_output(router, &out, buf, sizeof buf);
        if (result != CALLS_RESULT_OK) {
            CHECK_OK(result);
            return;
        }
        switch (out.kind) {
        case CALLS_OUTPUT_KIND_TIMEOUT:
            d->timeout_us = out.timeout_us;
            return;
        case CALLS_OUTPUT_KIND_TRANSMIT:
            d->transmits++;
            break;
        case CALLS_OUTPUT_KIND_SIGNAL:
            d->signals++;
            d->signal_session = out.session;
            CHECK(buf[out.len] == '\0');
            append_signal(d, (const char *)buf, out.len);
            break;
        case CALLS_OUTPUT_KIND_EVENT:
            d->events++;
            CHECK(buf[out.len] == '\0');
            if (out.event < 100) {
                d->event_kinds[out.event]++;
            }
            break;
        case CALLS_OUTPUT_KIND_RECORD:
            d->records++;
            d->recording = out.recording;
            if (out.record < 8) {
                d->record_kinds[out.record]++;
            }
            if (out.record != CALLS_RECORD_KIND_DATA) {
                CHECK(buf[out.len] == '\0');
                append_line(&d->record_text, &d->record_text_len, (const char *)buf, out.len);
            }
            break;
        default:
            CHECK(!"unknown output kind");
            return;
        }
    }
    CHECK(!"the router never reported a timeout");
}

/* ---------------------------------------------------------------------------------------- */
/* STUN                                                                                      */

static uint32_t crc32(const uint8_t *data, size_t len) {
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++) {
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v) {
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

/* A STUN binding request (RFC 5389) with USERNAME `username`, PRIORITY, a MESSAGE-INTEGRITY that
 * matches no password, and a correct FINGERPRINT. Returns its length. */
static size_t stun_request_with_bad_integrity(const char *username, uint8_t *out) {
    size_t n = 20;
    size_t ulen = strlen(username);
    put16(out, 0x0001);
    put32(out + 4, 0x2112A442u);
    for (int i = 0; i < 12; i++) {
        out[8 + i] = (uint8_t)(0x40 + i);
    }
    put16(out + n, 0x0006);
    put16(out + n + 2, (uint16_t)ulen);
    memcpy(out + n + 4, username, ulen);
    n += 4 + ulen;
    while (n % 4 != 0) {
        out[n++] = 0;
    }
    put16(out + n, 0x0024); /* PRIORITY: required in a binding request */
    put16(out + n + 2, 4);
    put32(out + n + 4, 0x6e7f00ffu);
    n += 8;
    put16(out + n, 0x0008);
    put16(out + n + 2, 20);
    memset(out + n + 4, 0xab, 20);
    n += 24;
    put16(out + n, 0x8028);
    put16(out + n + 2, 4);
    put16(out + 2, (uint16_t)(n + 8 - 20));
    put32(out + n + 4, crc32(out, n) ^ 0x5354554eu);
    return n + 8;
}

/* The value of `a=ice-ufrag:` in an SDP inside JSON text. */
static int find_ufrag(const char *text, char *ufrag, size_t size) {
    const char *at = strstr(text, "a=ice-ufrag:");
    if (at == NULL) {
        return 0;
    }
    at += strlen("a=ice-ufrag:");
    size_t len = 0;
    while (at[len] != '\0' && at[len] != '\\' && at[len] != '\r' && len + 1 < size) {
        ufrag[len] = at[len];
        len++;
    }
    ufrag[len] = '\0';
    return len > 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Tests                                                                                     */

static void version_and_result_names(void) {
    const char *version = NULL;
    CHECK_OK(calls_version(&version));
    CHECK(version != NULL && strncmp(version, "calls-ffi ", 10) == 0);
    CHECK_RESULT(calls_version(NULL), CALLS_RESULT_NULL_PARAMETER);

    const char *name = NULL;
    CHECK_OK(calls_result_name(CALLS_RESULT_BUFFER_TOO_SMALL, &name));
    CHECK(name != NULL && strcmp(name, "CALLS_RESULT_BUFFER_TOO_SMALL") == 0);
    CHECK_OK(calls_result_name(CALLS_RESULT_TCP_REFUSED, &name));
    CHECK(strcmp(name, "CALLS_RESULT_TCP_REFUSED") == 0);
    /* Event kinds are stable numbers too (the speaker event cannot be provoked without media). */
    CHECK(CALLS_EVENT_KIND_FLOW_ADMITTED == 7 && CALLS_EVENT_KIND_SPEAKER_CHANGED == 8);
    CHECK_RESULT(calls_result_name(12345, &name), CALLS_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "12345") != NULL);
    CHECK_RESULT(calls_result_name(0, NULL), CALLS_RESULT_NULL_PARAMETER);
}

static void last_error_message_reports_its_size(void) {
    CHECK_RESULT(calls_version(NULL), CALLS_RESULT_NULL_PARAMETER);
    size_t len = 0;
    CHECK_RESULT(calls_last_error_message(NULL, 0, &len), CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK(len == strlen("`out` is NULL") + 1);
    char small[4];
    size_t len2 = 0;
    CHECK_RESULT(calls_last_error_message(small, sizeof small, &len2),
                 CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK(len2 == len);
    CHECK_RESULT(calls_last_error_message(NULL, 10, &len2), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_last_error_message(small, sizeof small, NULL), CALLS_RESULT_NULL_PARAMETER);
    /* Fetching the message (even failing to) does not change it. */
    char message[64];
    CHECK_OK(calls_last_error_message(message, sizeof message, &len2));
    CHECK(strcmp(message, "`out` is NULL") == 0);
    CHECK(len2 == len - 1);
}

static void bad_configs_are_refused_with_every_problem(void) {
    calls_router *router = NULL;
    CHECK_RESULT(calls_router_new_json(NULL, T0, &router), CALLS_RESULT_NULL_PARAMETER);
    CHECK(router == NULL);
    CHECK_RESULT(calls_router_new_json("{}", T0, NULL), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_new_toml(NULL, T0, &router), CALLS_RESULT_NULL_PARAMETER);

    CHECK_RESULT(calls_router_new_json("{", T0, &router), CALLS_RESULT_CONFIG_INVALID);
    CHECK(router == NULL);
    CHECK(strstr(last_error(), "invalid configuration") != NULL);

    CHECK_RESULT(calls_router_new_json("{\"udp_port\":0,\"max_sessions\":0}", T0, &router),
                 CALLS_RESULT_CONFIG_INVALID);
    CHECK(strstr(last_error(), "`udp_port` 0 is not a port") != NULL);
    CHECK(strstr(last_error(), "`max_sessions` 0 admits nobody") != NULL);

    CHECK_RESULT(calls_router_new_toml("udp_prot = 1", T0, &router), CALLS_RESULT_CONFIG_INVALID);
    CHECK(strstr(last_error(), "udp_prot") != NULL);

    CHECK_RESULT(calls_router_new_toml("udp_port = \"\xff\xfe\"", T0, &router),
                 CALLS_RESULT_INVALID_UTF8);
    CHECK(router == NULL);
}

static void null_handles_are_errors(void) {
    uint8_t buf[64];
    size_t len = 0;
    calls_output out;
    calls_address addr;
    CHECK_OK(calls_address_parse("127.0.0.1:1", &addr));
    CHECK_RESULT(calls_router_join(NULL, "c", 1, "u", CALLS_GRANTS_ALL, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK(strstr(last_error(), "router") != NULL);
    CHECK_RESULT(calls_router_leave(NULL, 1, T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_set_muted(NULL, 1, true, T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_set_bandwidth_cap(NULL, 1, 250000, T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_start_draining(NULL), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_handle_datagram(NULL, &addr, &addr, buf, 1, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_tcp_accepted(NULL, 1, &addr, &addr), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_handle_tcp_data(NULL, 1, buf, 1, T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_tcp_closed(NULL, 1), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_handle_signal(NULL, 1, "{}", T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_handle_timeout(NULL, T0), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_poll_output(NULL, &out, buf, sizeof buf), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_metrics_json(NULL, (char *)buf, sizeof buf, &len),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_metrics_prometheus(NULL, (char *)buf, sizeof buf, &len),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_config_json(NULL, (char *)buf, sizeof buf, &len),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_session_count(NULL, &len), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_start_recording(NULL, "c", NULL, 0, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_stop_recording(NULL, "c", T0), CALLS_RESULT_NULL_PARAMETER);
    bool recording = false;
    CHECK_RESULT(calls_router_is_recording(NULL, "c", &recording), CALLS_RESULT_NULL_PARAMETER);
    /* Freeing NULL is allowed, like free(3). */
    CHECK_OK(calls_router_free(NULL));
}

static void addresses_convert_and_bad_ones_are_refused(void) {
    calls_address addr;
    CHECK_OK(calls_address_parse("192.0.2.7:8443", &addr));
    CHECK(addr.family == CALLS_ADDRESS_IPV4 && addr.port == 8443);
    CHECK(addr.ip[0] == 192 && addr.ip[1] == 0 && addr.ip[2] == 2 && addr.ip[3] == 7);
    char text[64];
    size_t len = 0;
    CHECK_OK(calls_address_format(&addr, text, sizeof text, &len));
    CHECK(strcmp(text, "192.0.2.7:8443") == 0 && len == strlen(text));
    CHECK_RESULT(calls_address_format(&addr, text, 5, &len), CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK(len == strlen("192.0.2.7:8443") + 1);

    CHECK_OK(calls_address_parse("[2001:db8::1]:443", &addr));
    CHECK(addr.family == CALLS_ADDRESS_IPV6 && addr.port == 443 && addr.ip[15] == 1);
    CHECK_OK(calls_address_format(&addr, text, sizeof text, &len));
    CHECK(strcmp(text, "[2001:db8::1]:443") == 0);

    CHECK_RESULT(calls_address_parse("localhost:80", &addr), CALLS_RESULT_INVALID_ADDRESS);
    CHECK_RESULT(calls_address_parse("192.0.2.7", &addr), CALLS_RESULT_INVALID_ADDRESS);
    CHECK_RESULT(calls_address_parse(NULL, &addr), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_address_parse("192.0.2.7:1", NULL), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_address_parse("\xc3\x28:1", &addr), CALLS_RESULT_INVALID_UTF8);

    addr.family = 5;
    CHECK_RESULT(calls_address_format(&addr, text, sizeof text, &len), CALLS_RESULT_INVALID_ADDRESS);
    CHECK(strstr(last_error(), "family 5") != NULL);
}

static void worker_of_datagram_reads_the_ufrag(void) {
    uint8_t stun[256];
    size_t n = stun_request_with_bad_integrity("w2aabcdefgh:remote", stun);
    int32_t worker = 0;
    CHECK_OK(calls_worker_of_datagram(stun, n, &worker));
    CHECK(worker == 0x2a);
    const uint8_t garbage[] = {0x80, 1, 2, 3};
    CHECK_OK(calls_worker_of_datagram(garbage, sizeof garbage, &worker));
    CHECK(worker == -1);
    CHECK_OK(calls_worker_of_datagram(NULL, 0, &worker));
    CHECK(worker == -1);
    CHECK_RESULT(calls_worker_of_datagram(NULL, 4, &worker), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_worker_of_datagram(stun, n, NULL), CALLS_RESULT_NULL_PARAMETER);
}

/* A participant joins, offers, gets an answer; errors along the way leave it in place. */
static void a_participant_joins_offers_and_gets_an_answer(void) {
    calls_router *router = NULL;
    CHECK_OK(calls_router_new_toml("udp_port = 40100\ntcp_port = 40100\n", T0, &router));
    if (router == NULL) {
        return;
    }
    drained d = {0};
    char text[8192];
    size_t len = 0;

    CHECK_OK(calls_router_config_json(router, text, sizeof text, &len));
    CHECK(strstr(text, "\"udp_port\":40100") != NULL && len == strlen(text));

    /* Join, and the errors join can give. */
    CHECK_OK(calls_router_join(router, "standup", 1, "alice", CALLS_GRANTS_ALL, T0));
    drain(router, &d);
    CHECK(d.events == 1 && d.event_kinds[CALLS_EVENT_KIND_JOINED] == 1);
    CHECK(d.timeout_us >= T0);
    CHECK_RESULT(calls_router_join(router, "standup", 1, "alice", CALLS_GRANTS_ALL, T0),
                 CALLS_RESULT_SESSION_EXISTS);
    CHECK(strstr(last_error(), "already exists") != NULL);
    CHECK_RESULT(calls_router_join(router, "standup", 2, "bob", 0x100, T0),
                 CALLS_RESULT_INVALID_ARGUMENT);
    CHECK_RESULT(calls_router_join(router, "standup", 2, "\xff", CALLS_GRANTS_ALL, T0),
                 CALLS_RESULT_INVALID_UTF8);
    CHECK_RESULT(calls_router_join(router, NULL, 2, "bob", CALLS_GRANTS_ALL, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_join(router, "standup", 2, "bob", CALLS_GRANTS_ALL, UINT64_MAX),
                 CALLS_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "now_us") != NULL);
    CHECK_OK(calls_router_session_count(router, &len));
    CHECK(len == 1);

    /* Signaling errors: unknown session, bad JSON (answered to the session), NULL. */
    CHECK_RESULT(calls_router_handle_signal(router, 99, OFFER, T0), CALLS_RESULT_UNKNOWN_SESSION);
    CHECK_RESULT(calls_router_handle_signal(router, 1, "{not json", T0 + 1000),
                 CALLS_RESULT_SIGNAL_BAD_JSON);
    drain(router, &d);
    CHECK(d.signals == 1 && d.signal_session == 1);
    CHECK(d.signal_text != NULL && strstr(d.signal_text, "\"code\":\"bad_json\"") != NULL);
    CHECK_RESULT(calls_router_handle_signal(router, 1, "{\"type\":\"answer\",\"sdp\":\"v=0\"}", T0),
                 CALLS_RESULT_SIGNAL_UNEXPECTED_ANSWER);
    drain(router, &d);
    CHECK(d.signals == 1);
    CHECK_RESULT(calls_router_handle_signal(router, 1, NULL, T0), CALLS_RESULT_NULL_PARAMETER);

    /* The offer: its answer does not fit a 16-byte buffer, and stays queued until it fits. */
    CHECK_OK(calls_router_handle_signal(router, 1, OFFER, T0 + 2000));
    calls_output out;
    uint8_t small[16];
    CHECK_RESULT(calls_router_poll_output(router, &out, small, sizeof small),
                 CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK(out.kind == CALLS_OUTPUT_KIND_SIGNAL && out.len > sizeof small);
    CHECK_RESULT(calls_router_poll_output(router, &out, NULL, 0), CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK_RESULT(calls_router_poll_output(router, &out, NULL, 10), CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_poll_output(router, NULL, small, sizeof small),
                 CALLS_RESULT_NULL_PARAMETER);
    size_t needed = out.len;
    uint8_t *answer = malloc(needed);
    CHECK(answer != NULL);
    CHECK_OK(calls_router_poll_output(router, &out, answer, needed));
    CHECK(out.kind == CALLS_OUTPUT_KIND_SIGNAL && out.session == 1 && out.len == needed - 1);
    CHECK(answer[out.len] == '\0');
    CHECK(strstr((const char *)answer, "\"type\":\"answer\"") != NULL);
    char ufrag[64] = "";
    CHECK(find_ufrag((const char *)answer, ufrag, sizeof ufrag));
    CHECK(strstr((const char *)answer, "a=candidate:") != NULL);
    free(answer);
    drain(router, &d);
    /* ICE-lite: the router sends nothing before the client's first STUN check. */
    CHECK(d.transmits == 0);

    /* STUN admission: a binding request for the session's ufrag with a bad MESSAGE-INTEGRITY,
     * garbage, and DTLS from a stranger get no reply at all. */
    calls_address client;
    calls_address local;
    CHECK_OK(calls_address_parse("127.0.0.1:50000", &client));
    CHECK_OK(calls_address_parse("127.0.0.1:40100", &local));
    char username[128];
    snprintf(username, sizeof username, "%s:evil", ufrag);
    uint8_t stun[256];
    size_t n = stun_request_with_bad_integrity(username, stun);
    CHECK_OK(calls_router_handle_datagram(router, &client, &local, stun, n, T0 + 3000));
    drain(router, &d);
    CHECK(d.transmits == 0);
    const uint8_t garbage[] = {0xff, 0x00, 0x12, 0x34};
    const uint8_t dtls[] = {22, 0xfe, 0xfd, 0, 0, 0, 0};
    CHECK_OK(calls_router_handle_datagram(router, &client, &local, garbage, sizeof garbage, T0 + 3000));
    drain(router, &d);
    CHECK(d.transmits == 0);
    CHECK_OK(calls_router_handle_datagram(router, &client, &local, dtls, sizeof dtls, T0 + 3000));
    drain(router, &d);
    CHECK(d.transmits == 0);
    /* Datagram argument errors. */
    calls_address bad = client;
    bad.family = 0;
    CHECK_RESULT(calls_router_handle_datagram(router, &bad, &local, stun, n, T0),
                 CALLS_RESULT_INVALID_ADDRESS);
    CHECK_RESULT(calls_router_handle_datagram(router, NULL, &local, stun, n, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_handle_datagram(router, &client, &local, NULL, 3, T0),
                 CALLS_RESULT_NULL_PARAMETER);

    /* The drops are counted, in JSON and in Prometheus text. */
    CHECK_RESULT(calls_router_metrics_json(router, NULL, 0, &len), CALLS_RESULT_BUFFER_TOO_SMALL);
    char *json = malloc(len);
    CHECK(json != NULL);
    CHECK_OK(calls_router_metrics_json(router, json, len, &len));
    CHECK(strstr(json, "\"stun_auth_failed\":1") != NULL);
    CHECK(strstr(json, "\"unclassified\":1") != NULL);
    CHECK(strstr(json, "\"unknown_source\":1") != NULL);
    CHECK(strstr(json, "\"sessions\":1") != NULL);
    free(json);
    CHECK_RESULT(calls_router_metrics_prometheus(router, text, 8, &len),
                 CALLS_RESULT_BUFFER_TOO_SMALL);
    char *prometheus = malloc(len);
    CHECK(prometheus != NULL);
    CHECK_OK(calls_router_metrics_prometheus(router, prometheus, len, &len));
    CHECK(strstr(prometheus, "calls_sessions 1") != NULL);
    CHECK(strstr(prometheus, "reason=\"stun_auth_failed\"} 1") != NULL);
    free(prometheus);

    /* ICE-TCP: announce, duplicate, oversized frame (forgotten), unknown connection. */
    CHECK_OK(calls_router_tcp_accepted(router, 7, &client, &local));
    CHECK_RESULT(calls_router_tcp_accepted(router, 7, &client, &local),
                 CALLS_RESULT_TCP_CONNECTION_EXISTS);
    CHECK_OK(calls_router_handle_tcp_data(router, 7, garbage + 1, 1, T0 + 4000));
    const uint8_t oversized[] = {0xff, 0xff, 0x00};
    CHECK_OK(calls_router_tcp_accepted(router, 8, &local, &client));
    CHECK_RESULT(calls_router_handle_tcp_data(router, 8, oversized, sizeof oversized, T0 + 4000),
                 CALLS_RESULT_TCP_FRAME_TOO_LARGE);
    CHECK_RESULT(calls_router_tcp_closed(router, 8), CALLS_RESULT_TCP_UNKNOWN_CONNECTION);
    CHECK_OK(calls_router_tcp_closed(router, 7));
    CHECK_RESULT(calls_router_handle_tcp_data(router, 7, garbage, 1, T0 + 4000),
                 CALLS_RESULT_TCP_UNKNOWN_CONNECTION);
    CHECK_RESULT(calls_router_tcp_accepted(router, 9, &bad, &local), CALLS_RESULT_INVALID_ADDRESS);
    drain(router, &d);

    /* Mute, time passing, leave. */
    CHECK_OK(calls_router_set_muted(router, 1, true, T0 + 5000));
    drain(router, &d);
    CHECK(d.event_kinds[CALLS_EVENT_KIND_MUTE_CHANGED] == 1);
    CHECK(d.signal_text != NULL && strstr(d.signal_text, "\"type\":\"muted\"") != NULL);
    CHECK_RESULT(calls_router_set_muted(router, 42, true, T0), CALLS_RESULT_UNKNOWN_SESSION);

    /* Bandwidth cap: set, changed, removed (0); unknown session; `now_us` out of range. */
    CHECK_OK(calls_router_set_bandwidth_cap(router, 1, 250000, T0 + 5000));
    drain(router, &d);
    CHECK_OK(calls_router_set_bandwidth_cap(router, 1, 1000, T0 + 5000));
    drain(router, &d);
    CHECK_OK(calls_router_set_bandwidth_cap(router, 1, 0, T0 + 5000));
    drain(router, &d);
    CHECK_RESULT(calls_router_set_bandwidth_cap(router, 42, 250000, T0 + 5000),
                 CALLS_RESULT_UNKNOWN_SESSION);
    CHECK(strstr(last_error(), "s42") != NULL);
    CHECK_RESULT(calls_router_set_bandwidth_cap(router, 42, 0, T0 + 5000),
                 CALLS_RESULT_UNKNOWN_SESSION);
    CHECK_RESULT(calls_router_set_bandwidth_cap(router, 1, 250000, UINT64_MAX),
                 CALLS_RESULT_INVALID_ARGUMENT);
    CHECK_OK(calls_router_handle_timeout(router, d.timeout_us));
    drain(router, &d);
    CHECK(d.timeout_us > T0);
    /* A time before the router's creation is fine (the caller's clock is any monotonic one). */
    CHECK_OK(calls_router_handle_timeout(router, T0 - 1000));
    drain(router, &d);

    CHECK_OK(calls_router_start_draining(router));
    CHECK_RESULT(calls_router_join(router, "standup", 3, "carol", CALLS_GRANTS_VIEWER, T0 + 6000),
                 CALLS_RESULT_DRAINING);
    CHECK_OK(calls_router_leave(router, 1, T0 + 7000));
    drain(router, &d);
    CHECK(d.event_kinds[CALLS_EVENT_KIND_LEFT] == 1);
    CHECK_RESULT(calls_router_leave(router, 1, T0 + 7000), CALLS_RESULT_UNKNOWN_SESSION);
    CHECK_OK(calls_router_session_count(router, &len));
    CHECK(len == 0);

    drained_reset(&d);
    CHECK_OK(calls_router_free(router));
}

/* Recording a call: start and stop, the outputs that tell the embedder, the members' signal,
 * and every refusal (unknown call, twice, bad arguments). */
static void a_call_is_recorded_and_every_misuse_is_refused(void) {
    calls_router *router = NULL;
    CHECK_OK(calls_router_new_json("{\"udp_port\":40300,\"tcp_port\":40300}", T0, &router));
    if (router == NULL) {
        return;
    }
    drained d = {0};
    bool recording = true;
    uint64_t bob = 2;

    CHECK_RESULT(calls_router_start_recording(router, "standup", NULL, 0, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_UNKNOWN_CALL);
    CHECK(strstr(last_error(), "standup") != NULL);
    CHECK_RESULT(calls_router_stop_recording(router, "standup", T0), CALLS_RESULT_UNKNOWN_CALL);
    CHECK_OK(calls_router_is_recording(router, "standup", &recording));
    CHECK(!recording);

    CHECK_OK(calls_router_join(router, "standup", 1, "alice", CALLS_GRANTS_ALL, T0));
    CHECK_OK(calls_router_join(router, "standup", 2, "bob", CALLS_GRANTS_ALL, T0));
    CHECK_OK(calls_router_join(router, "standup", 3, "cleo",
                               CALLS_GRANTS_ALL | CALLS_GRANT_UNRECORDABLE, T0));
    CHECK_OK(calls_router_handle_signal(router, 1, OFFER, T0 + 1000));
    drain(router, &d);

    /* Arguments are checked before anything starts. */
    CHECK_RESULT(calls_router_start_recording(router, "standup", NULL, 0, 0, T0),
                 CALLS_RESULT_INVALID_ARGUMENT);
    CHECK_RESULT(calls_router_start_recording(router, "standup", NULL, 0, 8, T0),
                 CALLS_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "CALLS_RECORD_") != NULL);
    CHECK_RESULT(calls_router_start_recording(router, "standup", NULL, 2, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_start_recording(router, NULL, NULL, 0, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_NULL_PARAMETER);
    CHECK_RESULT(calls_router_start_recording(router, "\xff", NULL, 0, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_INVALID_UTF8);
    CHECK_RESULT(calls_router_is_recording(router, "standup", NULL), CALLS_RESULT_NULL_PARAMETER);
    drain(router, &d);
    CHECK(d.records == 0);

    /* Bob's microphone only: `started` names the call and the options; both members hear. */
    CHECK_OK(calls_router_start_recording(router, "standup", &bob, 1, CALLS_RECORD_AUDIO,
                                          T0 + 2000));
    CHECK_OK(calls_router_is_recording(router, "standup", &recording));
    CHECK(recording);
    drain(router, &d);
    CHECK(d.records == 1 && d.record_kinds[CALLS_RECORD_KIND_STARTED] == 1);
    CHECK(d.recording == 1);
    CHECK(d.record_text != NULL &&
          strstr(d.record_text, "\"type\":\"started\"") != NULL &&
          strstr(d.record_text, "\"call\":\"standup\"") != NULL &&
          strstr(d.record_text, "\"sessions\":[2]") != NULL &&
          strstr(d.record_text, "\"camera\":false") != NULL);
    CHECK(d.signal_text != NULL && strstr(d.signal_text, "\"type\":\"recording\"") != NULL &&
          strstr(d.signal_text, "\"active\":true,\"recorded\":true") != NULL &&
          strstr(d.signal_text, "\"active\":true,\"recorded\":false") != NULL);
    CHECK_RESULT(calls_router_start_recording(router, "standup", NULL, 0, CALLS_RECORD_ALL, T0),
                 CALLS_RESULT_ALREADY_RECORDING);

    CHECK_OK(calls_router_stop_recording(router, "standup", T0 + 3000));
    drain(router, &d);
    CHECK(d.record_kinds[CALLS_RECORD_KIND_STOPPED] == 1 && d.recording == 1);
    CHECK(d.record_text != NULL && strstr(d.record_text, "\"type\":\"stopped\"") != NULL);
    CHECK(d.signal_text != NULL && strstr(d.signal_text, "\"active\":false") != NULL);
    CHECK_RESULT(calls_router_stop_recording(router, "standup", T0), CALLS_RESULT_NOT_RECORDING);
    CHECK_OK(calls_router_is_recording(router, "standup", &recording));
    CHECK(!recording);

    /* A second recording of the same call gets the next number. */
    CHECK_OK(calls_router_start_recording(router, "standup", NULL, 0, CALLS_RECORD_ALL, T0 + 4000));
    drain(router, &d);
    CHECK(d.record_kinds[CALLS_RECORD_KIND_STARTED] == 1 && d.recording == 2);
    /* Freed while recording: nothing leaks. */
    drained_reset(&d);
    CHECK_OK(calls_router_free(router));
}

/* Two routers with participants are freed while sessions are still up: nothing leaks. */
static void routers_with_live_sessions_free_cleanly(void) {
    calls_router *router = NULL;
    CHECK_OK(calls_router_new_json("{\"udp_port\":40200,\"tcp_port\":40200}", 1, &router));
    if (router == NULL) {
        return;
    }
    drained d = {0};
    CHECK_OK(calls_router_join(router, "c", 1, "a", CALLS_GRANTS_ALL, 2));
    CHECK_OK(calls_router_join(router, "c", 2, "b", CALLS_GRANTS_VIEWER, 3));
    CHECK_OK(calls_router_handle_signal(router, 1, OFFER, 4));
    drain(router, &d);
    CHECK(d.signals >= 2); /* the answer to 1, participant_joined to 1 */
    drained_reset(&d);
    /* An output left queued (and one held back for a too-small buffer) is freed too. */
    CHECK_OK(calls_router_join(router, "c", 3, "c", CALLS_GRANTS_ALL, 5));
    calls_output out;
    uint8_t tiny[1];
    CHECK_RESULT(calls_router_poll_output(router, &out, tiny, sizeof tiny),
                 CALLS_RESULT_BUFFER_TOO_SMALL);
    CHECK_OK(calls_router_free(router));
}

int main(void) {
    version_and_result_names();
    last_error_message_reports_its_size();
    bad_configs_are_refused_with_every_problem();
    null_handles_are_errors();
    addresses_convert_and_bad_ones_are_refused();
    worker_of_datagram_reads_the_ufrag();
    a_participant_joins_offers_and_gets_an_answer();
    a_call_is_recorded_and_every_misuse_is_refused();
    routers_with_live_sessions_free_cleanly();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
