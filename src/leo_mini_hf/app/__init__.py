"""The web demo (`leo-mini serve`) and the Hugging Face Space it becomes (`leo-mini space`)."""
