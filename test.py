"""Answer a question with a base model and a federated-trained adapter.

    python test.py --peft-path ~/flowertune-llm/runs/<run_id>/checkpoints/round-100 \
        --question "What is machine learning?" [--template vicuna_v1.1]

Same as ``flowertune-llm chat``; runs on a GPU when there is one, else on the CPU.
"""

import argparse
import sys

from flowertune_llm.cli import add_chat_arguments, chat

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_arguments(parser)
    sys.exit(chat(parser.parse_args()))
