"""Discretization-aware differentiable architecture search: DARTS, DA2S and multi-level entropy
search in one supernet, in plain PyTorch."""

from .config import ConfigError
from .data import DataConfig, SearchData, make_search_data
from .genotype import PUBLISHED, CellGenotype, Genotype, derive_genotype
from .runtime import Diverged, EpochEvent
from .search import SearchDiverged, SearchResult, rederive, run_search
from .settings import SearchConfig
from .space import SearchSpace, Target
from .supernet import Architecture, Supernet

__all__ = [
    "PUBLISHED",
    "Architecture",
    "CellGenotype",
    "ConfigError",
    "DataConfig",
    "Diverged",
    "EpochEvent",
    "Genotype",
    "SearchConfig",
    "SearchData",
    "SearchDiverged",
    "SearchResult",
    "SearchSpace",
    "Supernet",
    "Target",
    "derive_genotype",
    "make_search_data",
    "rederive",
    "run_search",
]
