"""Data preparation and loading: corpus -> tokenizer -> Megatron indexed datasets -> GPT/BERT samples."""

from mlmega.data.bert import BertMLMDataset, build_bert_datasets
from mlmega.data.corpus import Corpus, open_corpus, shakespeare_files, split_text
from mlmega.data.gpt import build_gpt_datasets, check_dataset_helpers, load_indexed, load_tokenizer
from mlmega.data.prepare import PrepareOptions, PrepareResult, prepare, read_meta, split_documents
from mlmega.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "BertMLMDataset",
    "Corpus",
    "PrepareOptions",
    "PrepareResult",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "build_bert_datasets",
    "build_gpt_datasets",
    "check_dataset_helpers",
    "load_indexed",
    "load_tokenizer",
    "open_corpus",
    "prepare",
    "read_meta",
    "shakespeare_files",
    "split_documents",
    "split_text",
]
