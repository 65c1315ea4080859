"""STS (query protocol): ``GetCallerIdentity`` only -- what the SageMaker SDK asks to learn the account id (for
its default bucket ``sagemaker-<region>-<account>``). Other actions get STS's own ``InvalidAction`` error."""

from __future__ import annotations

import urllib.parse
import uuid
from xml.sax.saxutils import escape

from pipelines import arns
from pipelines.local.api.protocol import Request, Response
from pipelines.local.storage.store import LOCAL_ACCOUNT

NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"


def _error(code: str, message: str, status: int = 400) -> Response:
    return Response.xml(f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>Sender</Type><Code>{code}</Code>'
                        f"<Message>{escape(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>"
                        "</ErrorResponse>", status=status)


def handle(request: Request) -> Response:
    form = urllib.parse.parse_qs(request.body().decode("utf-8", "replace")) if request.method == "POST" else {}
    action = (form.get("Action") or request.query.get("Action") or [""])[0]
    if action != "GetCallerIdentity":
        return _error("InvalidAction", f"Could not find operation {action or '(none)'} for version 2011-06-15 "
                      "(the local service implements GetCallerIdentity only)")
    user_arn = arns.arn("iam", request.scope.region, LOCAL_ACCOUNT, "user/local", global_service=True)
    return Response.xml(
        f'<GetCallerIdentityResponse xmlns="{NAMESPACE}"><GetCallerIdentityResult><Arn>{user_arn}</Arn>'
        f"<UserId>AIDALOCALUSER</UserId><Account>{LOCAL_ACCOUNT}</Account></GetCallerIdentityResult>"
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></GetCallerIdentityResponse>",
        headers={"Content-Type": "text/xml"})
