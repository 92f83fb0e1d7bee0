"""Pass or fail: the thresholds a CI job holds a load test to, and the check that the server
answers at all before any participant is started."""

import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from calls.loadtest import Participant, ParticipantStats

__all__ = [
    "Thresholds",
    "Verdict",
    "closed_as_planned",
    "expected_receivers",
    "judge",
    "parse_percent",
    "server_unreachable",
]


def parse_percent(text: str) -> float:
    """``"100%"``, ``"99.5%"`` or ``"1"`` (percent either way) as a number from 0 to 100."""
    value = float(text.strip().removesuffix("%"))
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{text!r} is not between 0% and 100%")
    return value


@dataclass(frozen=True)
class Thresholds:
    """What a run must reach to pass (the command line's ``--max-failed``,
    ``--min-receiving``, ``--max-loss``, ``--max-audio-delay``)."""

    #: Participants allowed to fail (no join, no connection, or an error).
    max_failed: int = 0
    #: Percent of the participants that have someone to hear or see who must receive media.
    min_receiving_percent: float = 100.0
    #: Percent of the media packets, over every participant, that may be lost.
    max_loss_percent: float = 1.0
    #: Audio delay (publisher's send to listener's receive) that 99 % of the participants
    #: keep 99 % of their audio under, ms: the 99th percentile over participants of each
    #: one's own 99th percentile (with fewer than 100 participants, the worst one's).
    max_audio_delay_ms: float = 400.0


@dataclass(frozen=True)
class Verdict:
    """The outcome: ``passed``, and each broken threshold in words."""

    failures: List[str]
    failed: int
    receiving: int
    expected_receivers: int
    loss_percent: float
    #: The audio delay held to ``max_audio_delay_ms`` (None: nobody received audio).
    audio_delay_p99_ms: Optional[float] = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> Dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "failed": self.failed,
            "receiving_media": self.receiving,
            "expected_receivers": self.expected_receivers,
            "loss_percent": self.loss_percent,
            "audio_delay_p99_ms": self.audio_delay_p99_ms,
        }


def _sends_media(p: Participant) -> bool:
    """Whether anyone can receive something of ``p``: a microphone that talks or sends silence
    (a muted one forwards nothing), a camera or a screen."""
    return p.speaking or not p.muted or p.video or p.screen


def expected_receivers(participants: Sequence[Participant]) -> List[bool]:
    """Per participant, whether someone else in its call sends media it could receive. A lone
    speaker among muted listeners hears nobody, and must not count against ``--min-receiving``."""
    senders: Dict[str, int] = {}
    for p in participants:
        senders[p.call] = senders.get(p.call, 0) + int(_sends_media(p))
    return [senders[p.call] - int(_sends_media(p)) > 0 for p in participants]


def closed_as_planned(p: Participant, s: ParticipantStats) -> bool:
    """Whether ``p`` stalled its reads on purpose (``stall_reading_after``), connected, and was
    then closed (its ICE-TCP connection, or its session when its ICE gave up first): what the
    server should do to it, so not a failure."""
    return (
        p.stall_reading_after is not None
        and s.connected_ms is not None
        and s.state == "failed"
    )


def judge(
    participants: Sequence[Participant],
    stats: Sequence[ParticipantStats],
    thresholds: Thresholds,
) -> Verdict:
    """Holds a finished run (``stats`` in the order of ``participants``) to ``thresholds``.
    A stalled reader that the server closed has not failed
    (:func:`closed_as_planned`)."""
    expected = expected_receivers(participants)
    by_index = {s.index: s for s in stats}
    failed = sum(
        1
        for s in stats
        if s.state == "failed"
        and not (s.index < len(participants) and closed_as_planned(participants[s.index], s))
    )
    receiving = sum(
        1
        for i, wanted in enumerate(expected)
        if wanted and i in by_index and by_index[i].packets_received > 0
    )
    n_expected = sum(expected)
    received = sum(s.packets_received for s in stats)
    lost = sum(s.lost for s in stats)
    loss = 100.0 * lost / (received + lost) if received + lost > 0 else 0.0
    failures: List[str] = []
    if failed > thresholds.max_failed:
        failures.append(
            f"{failed} of {len(participants)} participants failed "
            f"(--max-failed {thresholds.max_failed})"
        )
    if n_expected and 100.0 * receiving / n_expected < thresholds.min_receiving_percent:
        failures.append(
            f"{receiving} of {n_expected} participants received media, "
            f"{100.0 * receiving / n_expected:.1f}% "
            f"(--min-receiving {thresholds.min_receiving_percent:g}%)"
        )
    if loss > thresholds.max_loss_percent:
        failures.append(
            f"{loss:.2f}% of media packets lost ({lost} of {received + lost}) "
            f"(--max-loss {thresholds.max_loss_percent:g}%)"
        )
    delays = sorted(s.audio_delay_p99_ms for s in stats if s.audio_delay_p99_ms is not None)
    audio_delay = delays[max(0, math.ceil(0.99 * len(delays)) - 1)] if delays else None
    if audio_delay is not None and audio_delay > thresholds.max_audio_delay_ms:
        over = sum(1 for d in delays if d > thresholds.max_audio_delay_ms)
        failures.append(
            f"audio delay p99 {audio_delay:.0f} ms over the participants' own p99s; "
            f"{over} of {len(delays)} participants over "
            f"(--max-audio-delay {thresholds.max_audio_delay_ms:g} ms)"
        )
    return Verdict(
        failures=failures,
        failed=failed,
        receiving=receiving,
        expected_receivers=n_expected,
        loss_percent=loss,
        audio_delay_p99_ms=audio_delay,
    )


def server_unreachable(url: str, timeout: float = 3.0) -> Optional[str]:
    """Why the server at ``url`` cannot take a load test (in words), or None when its
    ``/healthz`` answers 200. A refused connection answers at once; silence takes ``timeout``."""
    health = url.rstrip("/") + "/healthz"
    if "://" not in health:
        health = "http://" + health
    health = health.replace("ws://", "http://", 1)
    try:
        with urllib.request.urlopen(health, timeout=timeout) as r:
            if r.status == 200:
                return None
            return f"{health} answered {r.status}"
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return f"{health} answered 503: the server is draining and refuses joins"
        return f"{health} answered {e.code}: is this a calls server?"
    except urllib.error.URLError as e:
        return f"cannot reach {url}: {e.reason} (is the server running?)"
    except OSError as e:
        return f"cannot reach {url}: {e} (is the server running?)"
