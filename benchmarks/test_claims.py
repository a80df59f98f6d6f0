"""The study's claims about BN, as regression gates.

Each claim uses the runs the matrix trained earlier in this session; run
alone, it trains what it needs. A claim fails the run when the measurements
stop supporting it. Claims our measurements do not support are the study's
known exceptions (bnsuite.study.PROFILES), each with the verdict our
measurements give: reported as an expected failure while that verdict holds,
failing the run when the claim starts to hold or its verdict moves
(bnsuite.claims.gate).
"""

import pytest

from bnsuite.core.claims import gate


@pytest.mark.claims
def test_claim_holds(claim, study, study_session, record_claim):
    records = [study_session.record(spec) for spec in claim.needs]
    result = claim.evaluate(records)
    record_claim(result, records)
    outcome, why = gate(result, study.claims.known_exception(claim.name))
    if outcome == "xfail":
        pytest.xfail(why)
    assert outcome == "pass", why
