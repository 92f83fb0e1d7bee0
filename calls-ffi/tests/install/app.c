/* A program built against an installed libcalls (tests/install/run.sh): it links, loads, makes a
 * router, joins a participant and counts the session. Prints "calls <version>: 1 session". */
#include <calls.h>
#include <stdio.h>

int main(void) {
    const char *version = NULL;
    struct calls_router *router = NULL;
    size_t sessions = 0;
    if (calls_version(&version) != CALLS_RESULT_OK ||
        calls_router_new_toml("udp_port = 8443\ntcp_port = 8443\n", 1000, &router) != CALLS_RESULT_OK ||
        calls_router_join(router, "standup", 1, "alice", CALLS_GRANTS_ALL, 2000) != CALLS_RESULT_OK ||
        calls_router_session_count(router, &sessions) != CALLS_RESULT_OK) {
        char msg[512];
        size_t n = 0;
        calls_last_error_message(msg, sizeof msg, &n);
        fprintf(stderr, "calls: %s\n", msg);
        return 1;
    }
    printf("calls %s: %zu session\n", version, sessions);
    calls_router_free(router);
    return sessions == 1 ? 0 : 1;
}
