"""imageloop: retrieval-augmented image generation and generative image retrieval as LangGraph loops.

Heavy libraries load lazily inside the backends, so importing this package stays fast.
"""

__version__ = "0.1.0"
