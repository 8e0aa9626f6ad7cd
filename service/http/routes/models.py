"""GET /v1/models and /v1/models/{name}: what is served, and whether it is trained."""

from __future__ import annotations

from fastapi import APIRouter

from service.http import route_errors
from service.http.deps import CallerDep
from service.http.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    response_model=ModelList,
    summary="List the served models",
    responses=route_errors.LIST_MODELS,
)
async def list_models(caller: CallerDep) -> ModelList:
    return ModelList(models=[ModelInfo(**entry.info()) for entry in caller.registry.entries()])


@router.get(
    "/{name}",
    response_model=ModelInfo,
    summary="Describe one model",
    responses=route_errors.GET_MODEL,
)
async def get_model(name: str, caller: CallerDep) -> ModelInfo:
    return ModelInfo(**caller.registry.get(name).info())
