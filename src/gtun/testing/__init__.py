"""fakes shipped beside the interfaces they stand for, as wireguard-go's tun/tuntest"""
