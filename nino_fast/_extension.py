def has_ext():
    return False


def has_cuda_ext():
    return False
