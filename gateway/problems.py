"""RFC 9457 problem details: every error the gateway answers, and how its OpenAPI shows them."""

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

PROBLEM = "application/problem+json"
TITLES = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
          413: "Content Too Large", 415: "Unsupported Media Type", 422: "Invalid request",
          429: "Too Many Requests"}


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


def documented(description: str) -> dict[str, Any]:
    """A response entry for a route's ``responses``: a problem, described."""
    return {"model": Problem, "description": description}


def problem(status: int, title: str, detail: str | None, request: Request) -> JSONResponse:
    return JSONResponse(Problem(title=title, status=status, detail=detail,
                                instance=str(request.url.path)).model_dump(),
                        status_code=status, media_type=PROBLEM)


async def http_problem(request: Request, exc: HTTPException) -> JSONResponse:
    response = problem(exc.status_code, TITLES.get(exc.status_code, "Error"), str(exc.detail),
                       request)
    for k, v in (exc.headers or {}).items():
        response.headers[k] = v
    return response


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                       for e in exc.errors())
    return problem(422, "Invalid request", detail, request)


def install(app: FastAPI) -> None:
    """Errors as problem details, and documented as what they are: application/problem+json."""
    app.add_exception_handler(HTTPException, http_problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]

    def openapi() -> dict[str, Any]:
        from fastapi.openapi.utils import get_openapi

        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
        for ops in doc["paths"].values():
            for op in ops.values():
                for code, response in op.get("responses", {}).items():
                    if code[:1] in "45":
                        response["content"] = {PROBLEM: schema}
                        response.setdefault("description", "Problem")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = Problem.model_json_schema()
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
