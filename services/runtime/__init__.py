"""The runtime every latentwire service shares: config, server bootstrap, errors, tensors, jobs, models.

Written once and imported by each service under services/<name>/; never copied.
"""
