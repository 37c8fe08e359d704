import sys, time, os, signal, re, subprocess
sys.path.insert(0, '/tmp/h3'); from lib import *
NS = ['unshare', '-m', 'sh', '-c', 'mount --bind /tmp/h3/hosts /etc/hosts && exec "$@"', 'sh']
b = Bal(6, 22006, ['dual.test:22101', 'v6only.test:22111', 'mapped.test:22101', '!', '127.1:22101'], workers=1, prefix=NS + [], )
rc, out, err = b.shell('show'); print(out)
for host in ['dual.test', 'v6only.test', 'mapped.test', 'mappedany.test', 'mappedbc.test', 'mappedmc.test', 'multi.test', 'blocked.test', '0', '127.1', '0x7f000001', '[::ffff:0.0.0.0]', '::ffff:0.0.0.0', '[::ffff:127.0.0.1]', '::ffff:255.255.255.255', '1.2.3']:
    rc, out, err = b.shell(f'create {host} 22101', extra=NS)
    print(host, rc, out.strip(), err.strip()[:200])
rc, out, err = b.shell('show', extra=NS); print(out)
print('stop', b.stop())
