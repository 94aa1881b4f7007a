"""llama.cpp: one supervised subprocess per loaded model (`worker`), watched by `supervisor`."""

from node_agent.runtimes.llama.supervisor import LlamaRunner, Runner, RunnerError, socket_path

__all__ = ["LlamaRunner", "Runner", "RunnerError", "socket_path"]
